#!/usr/bin/env bash
# Regenerate omni_rt/assets/question.wav: the demo's spoken question, "What is the weather like today?".
#
# Real (synthesized) speech from espeak-ng, padded with 0.3 s of silence at each end, resampled from espeak's
# 22.05 kHz to the model's 16 kHz with omni_rt.audio.load (scipy resample_poly), peak-normalised to 0.9 and
# written as mono 16-bit PCM with omni_rt.audio.write_wav (~3.5 s, ~110 KB).
#
# Needs: espeak-ng (apt-get update && apt-get install -y espeak-ng) and an installed omni_rt.
# Usage: bash scripts/make_question_wav.sh [OUT.wav]      (default: omni_rt/assets/question.wav)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-omni_rt/assets/question.wav}"
PYTHON="${PYTHON:-python3}"
TEXT="What is the weather like today?"

command -v espeak-ng >/dev/null || { echo "espeak-ng not found: apt-get install -y espeak-ng" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# -s 125 words/min: a little slower than espeak's default, closer to a person asking a question.
espeak-ng -v en-us -s 125 -w "$TMP/raw.wav" "$TEXT"

"$PYTHON" - "$TMP/raw.wav" "$OUT" <<'PY'
import sys

import numpy as np

from omni_rt import audio

src, out = sys.argv[1], sys.argv[2]
wav = audio.load(src)                                   # any rate/channels -> float32 mono 16 kHz
pad = np.zeros(int(0.3 * audio.SAMPLE_RATE), np.float32)
wav = np.concatenate([pad, wav, pad])
wav *= 0.9 / np.abs(wav).max()
audio.write_wav(out, wav, audio.SAMPLE_RATE)
print(f"wrote {out}: {wav.size / audio.SAMPLE_RATE:.2f} s at {audio.SAMPLE_RATE} Hz, mono 16-bit PCM")
PY
