#!/bin/sh
# An agent tool that fails.
cat > /dev/null
echo "partial output"
echo "no such city" >&2
exit 3
