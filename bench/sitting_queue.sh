#!/usr/bin/env bash
# A device sitting longer than one call: parity_sitting.sh's phases run one after another in a background process
# session (setsid: it outlives the call that starts it, until the machine is given back), and each later call only
# waits and brings back what has finished. The phases then need not fit one 600 s call, and no call's start or
# transfer sits between them. The machine stays held only while calls follow each other within its 30 s idle
# release: issue each poll right after the last returns.
#
#   call 1:  run(carry=[".ref", ".whl"])
#            QUEUE="setup:BASELINE=0,ATTN=0 golf_dense:STEPS=200,POSTQUANT=1 reference:STEPS=200,POSTQUANT=1" \
#            WAIT=540 bash bench/sitting_queue.sh start
#   call 2+: run(carry=[])  WAIT=560 bash bench/sitting_queue.sh poll
#
# QUEUE: items "PHASE:VAR=VALUE,VAR=VALUE" (parity_sitting.sh's phases and variables). `start` copies the working
# tree to /tmp/qrepo and runs the queue there (a later call's re-sent tree cannot change the files mid-run), then
# polls. `poll` waits WAIT seconds, or until the queue is done, and copies into $OUT each finished phase's .tgz and
# log not sent before, the queue's log and the running phase's last lines. Everything stays under /tmp/q too.
# QUEUE_PHASE_CMD replaces `bash bench/parity_sitting.sh` for each item (the CPU test runs `env` there);
# QUEUE_DIR and QUEUE_REPO move /tmp/q and /tmp/qrepo.
set -u
Q=${QUEUE_DIR:-/tmp/q}; R=${QUEUE_REPO:-/tmp/qrepo}; export OUT=${OUT:-/tmp/out}; mkdir -p "$Q" "$OUT"
cmd=${1:?start|poll|run}

run_queue() {  # the background process: one line of the queue at a time, in order; "A+B" runs A and B together
  cd "$R" || exit 1
  n=0
  while line=$(sed -n "$((n + 1))p" "$Q/items") && [ -n "$line" ]; do  # re-read: a poll may append (APPEND=)
    n=$((n + 1)); m=0; pids=()
    for item in ${line//+/ }; do
      [ $m -gt 0 ] && sleep "${STAGGER:-40}"  # the second starts once the first has its wheels in and is compiling
      m=$((m + 1)); run_item "$item" "$(printf %02d "$n")$(echo _abcdefgh | cut -c$((m + 1)))" & pids+=($!)
    done
    wait "${pids[@]}"
  done
  touch "$Q/all.done"
}

run_item() {  # $1 = PHASE:VAR=V,VAR=V  $2 = its number (01a, 01b, ...)
  local phase=${1%%:*} vars=${1#*:} name rc t0
  [ "$vars" = "$1" ] && vars=
  name=$2_$phase; mkdir -p "$Q/$name"
  echo "$(date +%T) start $name ($vars)"
  t0=$(date +%s)
  ( IFS=,; for kv in $vars; do export "${kv//\~/ }"; done; unset IFS  # "~" stands for a space (EXTRA=--set~a=b)
    OUT=$Q/$name PHASE=$phase ${QUEUE_PHASE_CMD:-bash bench/parity_sitting.sh} ) > "$Q/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$Q/$name.rc"
  echo "$(date +%T) end $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

send() {  # finished phases not sent before, the queue's log, the running phase's tail
  for rcf in "$Q"/*.rc; do
    [ -e "$rcf" ] || continue; name=$(basename "$rcf" .rc); [ -e "$Q/$name.sent" ] && continue
    cp "$Q/$name"/*.tgz "$OUT/$name.tgz" 2>/dev/null; cp "$Q/$name.log" "$OUT/$name.log"; touch "$Q/$name.sent"
    echo "sent $name: exit $(cut -d' ' -f1 "$rcf") after $(cut -d' ' -f2 "$rcf") s"
  done
  cp "$Q/queue.log" "$OUT/queue.log" 2>/dev/null
  for log in "$Q"/[0-9]*.log; do
    [ -e "$log" ] && [ ! -e "${log%.log}.rc" ] || continue
    echo "running: $(basename "$log")"; tail -c 1500 "$log" | grep -v "it/s\]" | tail -5
  done
}

case $cmd in
start)
  [ -e "$Q/items" ] && { echo "sitting_queue.sh: a queue was started on this machine already (see $Q/queue.log)" >&2; exit 2; }
  echo "${QUEUE:?QUEUE=\"PHASE:VAR=V,... PHASE:...\"}" | tr ' ' '\n' | grep -v '^$' > "$Q/items"
  rm -rf "$R"; mkdir -p "$R"; tar cf - --exclude='./.fa4a' --exclude='./.fa4b' . | tar xf - -C "$R"
  setsid nohup bash "$R/bench/sitting_queue.sh" run > "$Q/queue.log" 2>&1 < /dev/null &
  echo "queue started: $(tr '\n' ' ' < "$Q/items")"
  bash "$0" poll ;;
poll)
  [ -n "${APPEND:-}" ] && echo "$APPEND" | tr ' ' '\n' | grep -v '^$' >> "$Q/items" && echo "appended: $APPEND"
  [ -n "${CUT_AFTER:-}" ] && sed -i "$((CUT_AFTER + 1)),\$d" "$Q/items" && echo "queue cut after line $CUT_AFTER"
  end=$(( $(date +%s) + ${WAIT:-540} ))
  while [ "$(date +%s)" -lt "$end" ] && [ ! -e "$Q/all.done" ]; do sleep 5; done
  send
  [ -e "$Q/all.done" ] && echo "queue done" ;;
run)
  run_queue ;;
*)
  echo "sitting_queue.sh: start|poll|run" >&2; exit 2 ;;
esac
