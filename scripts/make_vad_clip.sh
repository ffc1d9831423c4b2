#!/usr/bin/env bash
# Regenerate tests/data/vad_clip.wav (+ vad_clip.json): espeak-ng speech between silences, for the Realtime
# server_vad test. espeak's own leading/trailing silence is trimmed with sox, then exactly LEAD s of silence go before
# the speech and TAIL s after it, so the speech boundaries are known: start = LEAD, end = LEAD + speech length.
# 24 kHz mono 16-bit PCM (the Realtime API's input rate).
# Needs: espeak-ng and sox (apt-get install -y espeak-ng sox).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-tests/data/vad_clip.wav}
LEAD=1.0
TAIL=1.5
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
espeak-ng -v en-us -s 150 -w "$TMP/raw.wav" "What is the weather like today"
# trim: drop everything before the first / after the last 10 ms above 0.5% of full scale
sox "$TMP/raw.wav" -r 24000 -c 1 -b 16 "$TMP/speech.wav" silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse norm -1
sox -n -r 24000 -c 1 -b 16 "$TMP/lead.wav" trim 0 "$LEAD"
sox -n -r 24000 -c 1 -b 16 "$TMP/tail.wav" trim 0 "$TAIL"
sox "$TMP/lead.wav" "$TMP/speech.wav" "$TMP/tail.wav" "$OUT"
SPEECH=$(soxi -D "$TMP/speech.wav")
python3 - "$OUT" "$LEAD" "$SPEECH" <<'PY'
import json, sys
out, lead, speech = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
meta = {"sample_rate": 24000, "speech_start_ms": round(lead * 1000), "speech_end_ms": round((lead + speech) * 1000),
        "text": "What is the weather like today"}
json.dump(meta, open(out[:-4] + ".json", "w"), indent=1)
print(out, meta)
PY
