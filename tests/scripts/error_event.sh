#!/bin/sh
# Reports an error as a JSON event after some text, then keeps running (it must be killed).
cat > /dev/null
echo '{"delta":"thinking"}'
echo '{"error":"tool quota exhausted"}'
sleep 300
