#!/bin/bash
# usage: try_env.sh "ENV=VAL ..."  -> restarts serve with that env, measures
cd /work/main
pkill -f "gsd-serve serve"; sleep 4; RAY_AUTH_MODE=disabled .venv/bin/ray stop --force >/dev/null 2>&1
(env RAY_AUTH_MODE=disabled $1 nohup .venv/bin/gsd-serve serve > /tmp/serve.log 2>&1 &)
for i in $(seq 1 80); do sleep 3; grep -q "gsd-serve: serving" /tmp/serve.log && break; done
.venv/bin/python /tmp/client.py http://127.0.0.1:8000/v1 1 >/dev/null
echo "== $1"
.venv/bin/python /tmp/cpu.py .venv/bin/python /tmp/client.py http://127.0.0.1:8000/v1 3 | grep -E "chunks|Target|Router|Proxy|wall"
