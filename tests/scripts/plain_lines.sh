#!/bin/sh
# Plain stdout lines: each is a piece of the reply. Also shows cwd and env reach the program.
read -r run
echo "Hello from $(basename "$PWD")"
echo "GREETING=$GREETING"
# The run arrived as one JSON object on stdin.
case "$run" in
  *'"content":"ping"'*) echo "got ping" ;;
  *) echo "no ping in: $run" ;;
esac
