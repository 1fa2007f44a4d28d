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
#   call 2+: run(carry=[])  WAIT=560 bash bench/sitting_queue.sh poll      (APPEND="ITEM ..." / CUT_AFTER=N edit
#            the lines not started yet)
#   to end:  run(carry=[])  bash bench/sitting_queue.sh stop               (the runner and every trainer it started)
#
# QUEUE: lines "PHASE:VAR=VALUE,VAR=VALUE" (parity_sitting.sh's phases and variables; "~" in a value stands for a
# space, e.g. EXTRA=--set~train.ce_kernel=triton). "A+B" on one line runs A and B at once on the one GPU: their
# loss curves and scores hold, their tokens/s do not. Two at once must not share a golf store (parity.sh copies the
# newest run folder out of it) or a wheel folder (SITE), and at most one may be the reference (run_reference.sh
# keeps fixed paths): `start` refuses a line that breaks this. Two trainings of the record take about 48 GiB each
# (the reference's reserved peak, 2026-12-02): three at once do not fit an H200's 139 GiB.
#
# `start` copies the working tree to /tmp/qrepo and runs the queue there (a later call's re-sent tree cannot change
# the files mid-run), then polls. `poll` waits WAIT seconds, until the queue is done or until its runner is gone,
# then packs each finished phase's .tgz and log not sent before into one $OUT/finished_<time>.tgz (a call brings
# back at most 8 files) beside the queue's log, and prints the running phases' last lines. Its exit status: 1 when
# a finished phase failed, else 0. ITEM_TIMEOUT (s, default 1500) ends a phase that hangs; parity.sh's trainers run
# in their own sessions and may outlive it: `stop` ends them too.
# QUEUE_PHASE_CMD replaces `bash bench/parity_sitting.sh` for each item (the CPU test runs a stand-in there);
# QUEUE_DIR and QUEUE_REPO move /tmp/q and /tmp/qrepo.
set -u
Q=${QUEUE_DIR:-/tmp/q}; R=${QUEUE_REPO:-/tmp/qrepo}; export OUT=${OUT:-/tmp/out}; mkdir -p "$Q" "$OUT"
cmd=${1:?start|poll|stop|run}

run_queue() {  # the background process: one line of the queue at a time, in order
  cd "$R" || exit 1
  n=0
  while :; do
    line=$(sed -n "$((n + 1))p" "$Q/items")
    if [ -z "$line" ]; then  # done, unless a poll appended a line just now
      touch "$Q/all.done"; line=$(sed -n "$((n + 1))p" "$Q/items")
      [ -z "$line" ] && break
      rm -f "$Q/all.done"
    fi
    n=$((n + 1)); m=0; pids=()
    for item in ${line//+/ }; do
      [ $m -gt 0 ] && sleep "${STAGGER:-40}"  # the second starts once the first has its wheels in and is compiling
      m=$((m + 1)); run_item "$item" "$(printf %02d "$n")$(echo _abcdefgh | cut -c$((m + 1)))" & pids+=($!)
    done
    wait "${pids[@]}"
  done
}

run_item() {  # $1 = PHASE:VAR=V,VAR=V  $2 = its number (01a, 01b, ...)
  local phase=${1%%:*} vars=${1#*:} name rc t0
  [ "$vars" = "$1" ] && vars=
  name=$2_$phase; mkdir -p "$Q/$name"
  echo "$(date +%T) start $name ($vars)"
  t0=$(date +%s)
  ( IFS=,; for kv in $vars; do export "${kv//\~/ }"; done; unset IFS
    OUT=$Q/$name PHASE=$phase timeout -k 30 "${ITEM_TIMEOUT:-1500}" ${QUEUE_PHASE_CMD:-bash bench/parity_sitting.sh} ) \
    > "$Q/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$Q/$name.rc"
  echo "$(date +%T) end $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

check_line() {  # items that run at once must not share a store, a wheel folder or the reference's fixed paths
  local line=$1 refs=0 stores="" sites="" item vars store site
  [ "${line//+/}" = "$line" ] && return 0
  for item in ${line//+/ }; do
    vars=,${item#*:},
    case ${item%%:*} in
      reference) refs=$((refs + 1)) ;;
      golf|golf_dense)
        store=$(echo "$vars" | grep -o ',GOLF_STORE=[^,]*' | cut -d= -f2); store=${store:-/tmp/golf-store}
        site=$(echo "$vars" | grep -o ',SITE=[^,]*' | cut -d= -f2); site=${site:-/tmp/site}
        case " $stores " in *" $store "*) echo "two golf runs at once in one store ($store): give each GOLF_STORE=" >&2; return 1 ;; esac
        case " $sites " in *" $site "*) echo "two runs at once install into one SITE ($site): give each its own" >&2; return 1 ;; esac
        stores="$stores $store"; sites="$sites $site" ;;
    esac
  done
  [ $refs -le 1 ] || { echo "two reference runs at once: run_reference.sh keeps fixed paths" >&2; return 1; }
  case " $sites " in *" /tmp/site "*) [ $refs -eq 1 ] && { echo "a golf run beside the reference needs SITE= (the reference installs into /tmp/site)" >&2; return 1; } ;; esac
  return 0
}

send() {  # finished phases not sent before, in one archive; the queue's log; the running phases' tails
  local new=() rcf name failed=0
  for rcf in "$Q"/*.rc; do
    [ -e "$rcf" ] || continue; name=$(basename "$rcf" .rc)
    [ "$(cut -d' ' -f1 "$rcf")" = 0 ] || failed=1
    [ -e "$Q/$name.sent" ] && continue
    new+=("$name.log"); [ -e "$Q/$name/$(echo "$name" | cut -d_ -f2-).tgz" ] && new+=("$name/$(echo "$name" | cut -d_ -f2-).tgz")
    echo "finished $name: exit $(cut -d' ' -f1 "$rcf") after $(cut -d' ' -f2 "$rcf") s"
  done
  if [ ${#new[@]} -gt 0 ]; then
    tar czf "$OUT/finished_$(date +%H%M%S).tgz" -C "$Q" "${new[@]}" || return 2
    for f in "${new[@]}"; do case $f in *.log) touch "$Q/${f%.log}.sent" ;; esac; done
  fi
  cp "$Q/queue.log" "$OUT/queue.log" 2>/dev/null
  for log in "$Q"/[0-9]*.log; do
    [ -e "$log" ] && [ ! -e "${log%.log}.rc" ] || continue
    echo "running: $(basename "$log")"; tail -c 1500 "$log" | grep -v "it/s\]" | tail -5
  done
  return $failed
}

alive() { [ -e "$Q/pid" ] && kill -0 "$(cat "$Q/pid")" 2>/dev/null; }

case $cmd in
start)
  [ -e "$Q/items" ] && { echo "sitting_queue.sh: a queue was started on this machine already (see $Q/queue.log)" >&2; exit 2; }
  echo "${QUEUE:?QUEUE=\"PHASE:VAR=V,... PHASE:...\"}" | tr ' ' '\n' | grep -v '^$' > "$Q/items.new"
  while read -r line; do check_line "$line" || { rm -f "$Q/items.new"; exit 2; }; done < "$Q/items.new"
  mv "$Q/items.new" "$Q/items"
  rm -rf "$R"; mkdir -p "$R"; tar cf - --exclude='./.fa4a' --exclude='./.fa4b' . | tar xf - -C "$R"
  setsid nohup bash "$R/bench/sitting_queue.sh" run > "$Q/queue.log" 2>&1 < /dev/null &
  echo $! > "$Q/pid"
  echo "queue started: $(tr '\n' ' ' < "$Q/items")"
  bash "$0" poll ;;
poll)
  [ -e "$Q/items" ] || { echo "sitting_queue.sh: no queue on this machine (a fresh one? start it again)" >&2; exit 2; }
  if [ -n "${APPEND:-}" ]; then
    echo "$APPEND" | tr ' ' '\n' | grep -v '^$' > "$Q/append"
    while read -r line; do check_line "$line" || exit 2; done < "$Q/append"
    cat "$Q/append" >> "$Q/items"; sleep 1
    if alive; then echo "appended: $APPEND"; else echo "sitting_queue.sh: the queue had ended: APPEND not run" >&2; exit 2; fi
  fi
  [ -n "${CUT_AFTER:-}" ] && sed -i "$((CUT_AFTER + 1)),\$d" "$Q/items" && echo "queue cut after line $CUT_AFTER"
  end=$(( $(date +%s) + ${WAIT:-540} ))
  while [ "$(date +%s)" -lt "$end" ] && [ ! -e "$Q/all.done" ] && alive; do sleep 2; done
  send; rc=$?
  if [ -e "$Q/all.done" ]; then echo "queue done"
  elif ! alive; then echo "sitting_queue.sh: the queue's runner is gone before the end (see queue.log)" >&2; rc=1
  fi
  exit $rc ;;
stop)
  alive && kill -TERM -- "-$(cat "$Q/pid")" 2>/dev/null
  pkill -TERM -f "golf.cli run|torchrun|run_reference|train_profile.py|attention_bench.py" 2>/dev/null
  sleep 5; pkill -KILL -f "golf.cli run|torchrun|record_1.0611|train_profile.py" 2>/dev/null
  send; echo "queue stopped" ;;
run)
  run_queue ;;
*)
  echo "sitting_queue.sh: start|poll|stop|run" >&2; exit 2 ;;
esac
