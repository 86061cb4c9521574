"""The audio recipe: wav -> fixed-length log-magnitude STFT (freq x time)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class AudioRecipe:
    """Defaults are the released recipe: 3 s at 22,050 Hz, n_fft 512, hop 353 -> 257 x 188."""

    sample_rate: int = 22050
    seconds: float = 3.0
    n_fft: int = 512
    hop_length: int = 353
    num_frames: int = 188

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_bins, self.num_frames

    def key(self) -> str:
        """A short string naming these parameters (used to key the spectrogram cache)."""
        return "sr{sample_rate}-s{seconds:g}-n{n_fft}-h{hop_length}-t{num_frames}".format(**asdict(self))


def write_wav(path, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a wav file. Encoded in memory first: libsndfile fsyncs every file it closes,
    which made writing AV-Digits' 1,797 short clips take seconds of disk flushes."""
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, subtype=subtype, format="WAV")
    Path(path).write_bytes(buffer.getvalue())


def load_waveform(path, recipe: AudioRecipe) -> np.ndarray:
    """Read ``path`` at the recipe's rate, tile short clips and cut to the recipe's length."""
    import librosa  # here, not at import: it takes about a second and start-up needs none of it

    samples, _ = librosa.load(path, sr=recipe.sample_rate, mono=True)
    if samples.size == 0:
        raise ValueError("empty audio")
    length = int(round(recipe.sample_rate * recipe.seconds))
    samples = np.tile(samples, math.ceil(length / samples.size))[:length]
    return np.clip(samples, -1.0, 1.0)


def log_spectrogram(samples: np.ndarray, recipe: AudioRecipe) -> np.ndarray:
    """log(|STFT| + 1e-7), padded or cut on the time axis to exactly ``num_frames``.

    The signal is centred with reflect padding, as librosa 0.8 (the released code's) did by
    default; librosa 0.10 changed the default to zeros, which moves the first and last frames
    by up to several log units."""
    import librosa

    stft = librosa.stft(samples, n_fft=recipe.n_fft, hop_length=recipe.hop_length,
                        center=True, pad_mode="reflect")
    spec = np.log(np.abs(stft) + 1e-7)
    frames = spec.shape[1]
    if frames < recipe.num_frames:
        spec = np.pad(spec, ((0, 0), (0, recipe.num_frames - frames)), mode="edge")
    return spec[:, :recipe.num_frames].astype(np.float32)


def warm_up(recipe: AudioRecipe) -> None:
    """Run the STFT once on silence: librosa imports numba and scipy on first use (about 2 s).
    Done in the process that starts the DataLoader workers, forked workers inherit all of
    it instead of each paying for it again."""
    log_spectrogram(np.zeros(recipe.n_fft * 2, dtype=np.float32), recipe)


def wav_to_spectrogram(path, recipe: AudioRecipe) -> np.ndarray:
    return log_spectrogram(load_waveform(path, recipe), recipe)
