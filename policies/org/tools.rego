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

exe_base := exe_parts[count(exe_parts) - 1]

argv0_parts := split(input.argv[0], "/")

argv0_base := argv0_parts[count(argv0_parts) - 1]

# The names the program goes by: the file executed, the name it was called
# by, and a busybox applet.
names contains exe_base

names contains argv0_base

names contains input.argv[1] if exe_base == "busybox"

# Other names of the same file (or of an identical copy) in the system's
# program directories, found by the gate.
names contains n if some n in input.exe_aliases

args := array.slice(input.argv, 1, count(input.argv))

# What a removal target amounts to, without trailing `/`, `.` and `*`.
root_like := {"", "/workspace", "/home/dev", "~", "$HOME"}

interpreters := {"sh", "bash", "dash", "zsh", "python", "python3", "node", "perl", "ruby"}

# Recursive, forced removal of the root, the workspace, or the home. (A
# glob the shell expanded before exec, `rm -rf /workspace/*`, arrives as
# the files it matched and is not recognised.) Each condition looks at the
# arguments once, so a long argument list costs linear time.
rm_recursive if {
	some flag in args
	startswith(flag, "-")
	contains(lower(flag), "r")
}

rm_forced if {
	some flag in args
	startswith(flag, "-")
	contains(flag, "f")
}

rm_root_target if {
	some target in args
	not startswith(target, "-")
	trim_right(target, "/.*") in root_like
}

findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/rm-root",
	"reason": "recursive forced removal of /, /workspace or the home directory",
} if {
	"rm" in names
	rm_recursive
	rm_forced
	rm_root_target
}

# Programs run from scratch space, directly or through an interpreter.
findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/scratch-exec",
	"reason": "running programs from /tmp, /var/tmp or /dev/shm",
} if {
	some prefix in ["/tmp/", "/var/tmp/", "/dev/shm/"]
	startswith(input.exe, prefix)
}

findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/scratch-exec",
	"reason": "running programs from /tmp, /var/tmp or /dev/shm",
} if {
	some n in names
	n in interpreters
	some a in args
	some prefix in ["/tmp/", "/var/tmp/", "/dev/shm/"]
	startswith(a, prefix)
}

# Force-pushing rewrites shared history: held for review.
force_flag(a) if a in {"--force", "-f", "--force-with-lease", "--force-if-includes"}

force_flag(a) if startswith(a, "--force-with-lease=")

force_flag(a) if {
	startswith(a, "-")
	not startswith(a, "--")
	contains(a, "f")
}

# A `+` refspec forces that ref.
force_flag(a) if startswith(a, "+")

findings contains {
	"risk": "review-required",
	"rule": "org.rego/force-push",
	"reason": "git push --force rewrites history others have",
} if {
	"git" in names
	"push" in args
	some a in args
	force_flag(a)
}

# Reading credential stores is never needed inside.
findings contains {
	"risk": "blocked-by-default",
	"rule": "org.rego/credential-files",
	"reason": "reading credential stores (.ssh keys, .netrc, cloud credentials)",
} if {
	some a in args
	some pattern in [".ssh", ".netrc", ".aws/credentials", ".config/gcloud", ".docker/config.json"]
	contains(a, pattern)
}
