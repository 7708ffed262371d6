#!/bin/sh
# An agent tool that counts its calls in $COUNT_FILE.
cat > /dev/null
echo x >> "$COUNT_FILE"
echo "call $(wc -l < "$COUNT_FILE")"
