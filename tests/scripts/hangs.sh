#!/bin/sh
# Starts a child, records both pids in $PID_DIR, prints one line and then hangs.
cat > /dev/null
sleep 300 &
echo "$$ $!" > "$PID_DIR/pids.tmp" && mv "$PID_DIR/pids.tmp" "$PID_DIR/pids"
echo "started"
sleep 300
echo "never"
