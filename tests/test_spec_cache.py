"""The on-disk spectrogram cache: computed once, keyed by recipe and wav, safe with workers."""
import logging
import os
import pickle

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from config import Config
from datasets import audio
from datasets.audio import AudioRecipe
from datasets.builders import spectrogram_function
from datasets.spec_cache import SpectrogramCache, cached_spectrogram_fn
from tests.media_fixtures import write_wav

RECIPE = AudioRecipe(sample_rate=8000, seconds=0.5, n_fft=62, hop_length=125, num_frames=16)


@pytest.fixture
def counted_stft(monkeypatch):
    """Replace the STFT by a counting wrapper around the real one."""
    calls = []
    real = audio.wav_to_spectrogram

    def counting(path, recipe):
        calls.append((str(path), recipe.key()))
        return real(path, recipe)

    monkeypatch.setattr(audio, "wav_to_spectrogram", counting)
    return calls


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("OLM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for n in range(4):
        write_wav(data / "audio" / f"clip{n}.wav", seconds=0.3, sample_rate=8000, frequency=300 + 100 * n)
    return data


def test_second_call_reads_the_cache(root, counted_stft, tmp_path):
    wav = root / "audio" / "clip0.wav"
    first = cached_spectrogram_fn(root)(wav, RECIPE)
    again = cached_spectrogram_fn(root)(wav, RECIPE)  # a new instance, as in a second run
    assert len(counted_stft) == 1
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, audio.log_spectrogram(audio.load_waveform(wav, RECIPE), RECIPE))
    assert first.shape == (32, 16) and first.dtype == np.float32
    entries = list((tmp_path / "cache" / "spectrograms").rglob("*.npz"))
    assert len(entries) == 1 and RECIPE.key() in str(entries[0]) and "audio/clip0.npz" in str(entries[0])
    assert (entries[0].parents[2] / "root.txt").read_text().strip() == str(root.resolve())


def test_a_different_recipe_is_a_different_entry(root, counted_stft):
    cache = cached_spectrogram_fn(root)
    wav = root / "audio" / "clip1.wav"
    other = AudioRecipe(sample_rate=8000, seconds=0.5, n_fft=126, hop_length=125, num_frames=16)
    assert cache.entry_path(wav, RECIPE) != cache.entry_path(wav, other)
    assert cache(wav, RECIPE).shape == (32, 16)
    assert cache(wav, other).shape == (64, 16)
    assert cache(wav, other).shape == (64, 16)
    assert [key for _, key in counted_stft] == [RECIPE.key(), other.key()]


def test_an_edited_wav_is_recomputed(root, counted_stft):
    cache = cached_spectrogram_fn(root)
    wav = root / "audio" / "clip2.wav"
    before = cache(wav, RECIPE)
    write_wav(wav, seconds=0.3, sample_rate=8000, frequency=1500)  # re-extracted with other content
    stat = os.stat(wav)
    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = cache(wav, RECIPE)
    assert len(counted_stft) == 2 and not np.allclose(before, after)
    assert np.array_equal(cache(wav, RECIPE), after) and len(counted_stft) == 2


def test_a_damaged_entry_is_recomputed(root, counted_stft, caplog):
    cache = cached_spectrogram_fn(root)
    wav = root / "audio" / "clip3.wav"
    good = cache(wav, RECIPE)
    cache.entry_path(wav, RECIPE).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(cache(wav, RECIPE), good)
    assert "damaged" in caplog.text and len(counted_stft) == 2


def test_an_unwritable_cache_warns_once_and_still_computes(root, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    cache = SpectrogramCache(root, cache_dir=blocker)
    with caplog.at_level(logging.WARNING):
        values = [cache(root / "audio" / f"clip{n}.wav", RECIPE) for n in range(3)]
    assert all(v.shape == (32, 16) for v in values)
    assert caplog.text.count("spectrogram cache disabled") == 1 and not cache.writable


def test_a_missing_wav_still_raises(root):
    with pytest.raises(FileNotFoundError):
        cached_spectrogram_fn(root)(root / "audio" / "absent.wav", RECIPE)


class Spectrograms(Dataset):
    def __init__(self, wavs, spectrogram_fn):
        self.wavs, self.spectrogram_fn = wavs, spectrogram_fn

    def __len__(self):
        return len(self.wavs)

    def __getitem__(self, index):
        return self.spectrogram_fn(self.wavs[index], RECIPE)


def test_loader_workers_fill_the_cache_without_leftovers(root, tmp_path):
    cache = cached_spectrogram_fn(root)
    assert isinstance(pickle.loads(pickle.dumps(cache)), SpectrogramCache)
    wavs = [root / "audio" / f"clip{n % 4}.wav" for n in range(16)]  # each clip read by both workers
    loader = DataLoader(Spectrograms(wavs, cache), batch_size=2, num_workers=2)
    batches = [batch for batch in loader]
    assert sum(len(b) for b in batches) == 16
    folder = tmp_path / "cache" / "spectrograms"
    assert len(list(folder.rglob("*.npz"))) == 4
    assert not list(folder.rglob("*.tmp"))
    for n in range(4):  # every entry is whole and matches a fresh computation
        wav = root / "audio" / f"clip{n}.wav"
        with np.load(cache.entry_path(wav, RECIPE)) as stored:
            np.testing.assert_array_equal(stored["spectrogram"], audio.wav_to_spectrogram(wav, RECIPE))


def test_builders_use_the_cache_only_when_enabled(root):
    assert isinstance(spectrogram_function(Config(spec_cache=True), root), SpectrogramCache)
    assert spectrogram_function(Config(spec_cache=False), root) is None


def test_avdigits_loads_through_the_cache(avdigits_default, tmp_path, monkeypatch, counted_stft):
    from config import get_dataset_spec
    from datasets.builders import build_data

    monkeypatch.setenv("OLM_CACHE", str(tmp_path / "cache"))  # an empty spectrogram cache
    spec = get_dataset_spec("AVDigits")
    # The session's build (tests/conftest.py) as --data-root: materializing costs seconds.
    cfg = Config(**{**spec.defaults, "dataset": "AVDigits", "data_root": str(avdigits_default)})
    data = build_data(cfg, spec)
    first, _ = data.test[0]
    second, _ = data.test[0]
    assert len(counted_stft) == 1
    assert first["audio"].shape == (1, 64, 64) and (first["audio"] == second["audio"]).all()
    assert any((tmp_path / "cache" / "spectrograms").rglob("*.npz"))
