package aibox.tools

import rego.v1

req(argv, exe) := {"argv": argv, "exe": exe, "exe_sha256": "", "cwd": "/workspace", "uid": 1000, "env_names": [], "sandbox": "t"}

rules(i) := {f.rule | some f in findings with input as i}

test_rm_root_is_blocked if {
	"org.rego/rm-root" in rules(req(["rm", "-rf", "/"], "/usr/bin/rm"))
	"org.rego/rm-root" in rules(req(["rm", "-r", "-f", "/workspace"], "/usr/bin/rm"))
	"org.rego/rm-root" in rules(req(["rm", "-Rf", "/workspace/."], "/usr/bin/rm"))
	"org.rego/rm-root" in rules(req(["rm", "--recursive", "--force", "//"], "/usr/bin/rm"))
	"org.rego/rm-root" in rules(req(["busybox", "rm", "-rf", "/home/dev/"], "/usr/bin/busybox"))
}

test_rm_of_a_file_is_fine if {
	count(rules(req(["rm", "-rf", "build"], "/usr/bin/rm"))) == 0
	count(rules(req(["rm", "/workspace/x"], "/usr/bin/rm"))) == 0
}

test_renamed_rm_is_still_rm if {
	# The executed file decides, not argv[0].
	"org.rego/rm-root" in rules(req(["cleanup", "-rf", "/"], "/usr/bin/rm"))
}

test_scratch_exec_is_blocked if {
	"org.rego/scratch-exec" in rules(req(["./x"], "/tmp/x"))
	"org.rego/scratch-exec" in rules(req(["python3", "/tmp/x.py"], "/usr/bin/python3.11"))
	"org.rego/scratch-exec" in rules(req(["x"], "/dev/shm/x"))
	count(rules(req(["make"], "/usr/bin/make"))) == 0
}

test_force_push_needs_review if {
	"org.rego/force-push" in rules(req(["git", "push", "--force", "origin"], "/usr/bin/git"))
	"org.rego/force-push" in rules(req(["git", "push", "-fu", "origin"], "/usr/bin/git"))
	"org.rego/force-push" in rules(req(["git", "push", "origin", "+main"], "/usr/bin/git"))
	"org.rego/force-push" in rules(req(["git", "push", "--force-with-lease=main", "origin"], "/usr/bin/git"))
	count(rules(req(["git", "push", "origin"], "/usr/bin/git"))) == 0
}

test_credential_files if {
	"org.rego/credential-files" in rules(req(["cat", "/home/dev/.ssh/id_ed25519"], "/usr/bin/cat"))
	"org.rego/credential-files" in rules(req(["tar", "cf", "-", "/home/dev/.ssh"], "/usr/bin/tar"))
	count(rules(req(["cat", "README.md"], "/usr/bin/cat"))) == 0
}
