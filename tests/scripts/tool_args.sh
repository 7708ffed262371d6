#!/bin/sh
# An agent tool that proves it got its arguments: prints them back with its argv and cwd.
printf 'args were %s in %s' "$(cat)" "$(basename "$PWD")"
