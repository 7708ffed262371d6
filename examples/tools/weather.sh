#!/bin/sh
# An agent tool: reads the call's arguments (JSON) on stdin, prints the result on stdout.
# A non-zero exit (with a message on stderr) is reported to the model as the tool's result.
args=$(cat)
city=$(printf '%s' "$args" | sed -n 's/.*"city"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
if [ -z "$city" ]; then
  echo "weather: no city in $args" >&2
  exit 2
fi
echo "{\"city\":\"$city\",\"sky\":\"clear\",\"celsius\":21}"
