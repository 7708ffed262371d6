#!/bin/sh
# An agent tool that takes a few seconds.
cat > /dev/null
sleep 3
echo "slow result"
