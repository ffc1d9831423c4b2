"""Server-side voice activity detection for the Realtime API's ``server_vad``: silero-vad (its model ships inside
the package; installed without extras) over 16 kHz audio in 32 ms windows.

``StreamingVad.push(wav_16k)`` returns the boundary events found in that audio, as
``("start" | "end", ms from the start of the stream)``: "start" at the first window whose speech probability reaches
``threshold``, "end" at the first window of a silence that lasted ``silence_ms``.
"""
from __future__ import annotations

import numpy as np

WINDOW = 512          # samples at 16 kHz (32 ms): what silero-vad takes
RATE = 16000


def available() -> bool:
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        return False
    return True


class StreamingVad:
    def __init__(self, threshold: float = 0.5, silence_ms: int = 500):
        try:
            from silero_vad import VADIterator, load_silero_vad
        except ImportError as e:
            raise ImportError("server_vad needs silero-vad: pip install --no-deps silero-vad packaging") from e
        if not 0 < threshold < 1:
            raise ValueError(f"turn_detection.threshold must be in (0, 1), got {threshold}")
        if silence_ms < 0:
            raise ValueError(f"turn_detection.silence_duration_ms must be >= 0, got {silence_ms}")
        self.model = load_silero_vad()
        # speech_pad_ms=0: report the detected boundaries themselves (the committed audio keeps everything anyway)
        self.it = VADIterator(self.model, threshold=threshold, sampling_rate=RATE,
                              min_silence_duration_ms=silence_ms, speech_pad_ms=0)
        self.rest = np.zeros(0, dtype=np.float32)
        self.speaking = False

    def push(self, wav_16k: np.ndarray) -> list[tuple[str, float]]:
        import torch

        x = np.concatenate([self.rest, np.asarray(wav_16k, dtype=np.float32)])
        n = x.size // WINDOW * WINDOW
        self.rest = x[n:]
        events = []
        for i in range(0, n, WINDOW):
            ev = self.it(torch.from_numpy(x[i:i + WINDOW].copy()))
            if ev and "start" in ev:
                self.speaking = True
                events.append(("start", ev["start"] * 1000.0 / RATE))
            elif ev and "end" in ev:
                self.speaking = False
                events.append(("end", ev["end"] * 1000.0 / RATE))
        return events

    def reset(self) -> None:
        self.it.reset_states()
        self.rest = np.zeros(0, dtype=np.float32)
        self.speaking = False
