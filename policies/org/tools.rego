# aibox org baseline: command findings that YAML rules cannot express.
#
# Input (one exec request):
#   argv        [string]  the command line
#   exe         string    resolved path of the file executed
#   exe_sha256  string    its SHA-256 (may be empty when unknown)
#   cwd         string
#   uid         number
#   env_names   [string]
#   sandbox     string
# Data: data.policy is the merged YAML policy.
#
# Each finding is {risk, rule, reason}; the strictest finding (or YAML tool
# rule) decides. Risk classes: safe < review-required < blocked-by-default.
package aibox.tools

import rego.v1

exe_parts := split(input.exe, "/")

base := exe_parts[count(exe_parts) - 1]

args := array.slice(input.argv, 1, count(input.argv))

# Recursive, forced removal of the root, the workspace, or the home.
findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/rm-root",
	"reason": "recursive forced removal of /, /workspace or the home directory",
} if {
	base == "rm"
	some flag in args
	startswith(flag, "-")
	contains(flag, "r")
	some f2 in args
	startswith(f2, "-")
	contains(f2, "f")
	some target in args
	target in {"/", "/*", "/workspace", "/workspace/", "/workspace/*", "/home/dev", "~"}
}

# Programs run from scratch space (tmpfs is noexec; this also names the
# attempt when a script interpreter is pointed at it).
findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/scratch-exec",
	"reason": "running programs from /tmp, /var/tmp or /dev/shm",
} if {
	some prefix in ["/tmp/", "/var/tmp/", "/dev/shm/"]
	startswith(input.exe, prefix)
}

# Force-pushing rewrites shared history: held for review.
findings contains {
	"risk": "review-required",
	"rule": "org.rego/force-push",
	"reason": "git push --force rewrites history others have",
} if {
	base == "git"
	"push" in args
	some a in args
	a in {"--force", "-f", "--force-with-lease"}
}

# Reading the sandbox's own credentials helpers' stores is never needed.
findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/credential-files",
	"reason": "reading credential stores (.ssh keys, .netrc, cloud credentials)",
} if {
	some a in args
	some pattern in [".ssh/id_", ".netrc", ".aws/credentials", ".config/gcloud/", ".docker/config.json"]
	contains(a, pattern)
}
