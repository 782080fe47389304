# Helpers over the exec request, for the org baseline and for the Rego
# modules policy tiers add (import data.aibox.exec).
package aibox.exec

import rego.v1

exe_parts := split(input.exe, "/")

# Base name of the file executed.
exe_base := exe_parts[count(exe_parts) - 1]

argv0_parts := split(input.argv[0], "/")

# Base name the program was called by.
argv0_base := argv0_parts[count(argv0_parts) - 1]

# The names the program goes by: the file executed, the name it was
# called by, a busybox applet, and the other names of the same file (or of
# an identical copy) in the system's program directories.
names contains exe_base

names contains argv0_base

names contains input.argv[1] if exe_base == "busybox"

names contains n if some n in input.exe_aliases

# The arguments after the program.
args := array.slice(input.argv, 1, count(input.argv))
