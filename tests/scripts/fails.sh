#!/bin/sh
# Writes part of a reply, complains on stderr, and exits with status 2.
cat > /dev/null
echo "partial"
echo "loading model" >&2
echo "model file missing: /models/x.gguf" >&2
exit 2
