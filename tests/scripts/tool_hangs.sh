#!/bin/sh
# An agent tool that starts a child, records both pids in $PID_DIR, then hangs.
cat > /dev/null
sleep 300 &
echo "$$ $!" > "$PID_DIR/pids.tmp" && mv "$PID_DIR/pids.tmp" "$PID_DIR/pids"
sleep 300
