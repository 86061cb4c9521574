"""Linear / MLP probes per modality on AV-Digits, to see where the noise knobs sit.

For each noise setting it materializes AV-Digits into a scratch folder, trains
scikit-learn classifiers on train and reports val/test accuracy per modality:
audio on time-pooled log-mel statistics (shift-invariant, since the word sits at
a random offset), vision on the frames averaged and pooled back to 8x8. These are
weaker learners than the training job's CNNs, so treat the numbers as lower bounds.

    python benchmarks/avdigits_probe.py
    python benchmarks/avdigits_probe.py --audio-snr=-10,0 --visual-noise 0.6 0.8
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def audio_features(root: Path, clips):
    import librosa
    import soundfile as sf

    rows = []
    for clip in clips:
        samples, rate = sf.read(str(root / "audio" / f"{clip}.wav"), dtype="float32")
        mel = librosa.feature.melspectrogram(y=samples, sr=rate, n_fft=512, hop_length=160,
                                             n_mels=40)
        log_mel = np.log(mel + 1e-6)
        rows.append(np.concatenate([log_mel.mean(1), log_mel.std(1), log_mel.max(1)]))
    return np.stack(rows)


def visual_features(root: Path, clips):
    import cv2

    rows = []
    for clip in clips:
        frame_paths = sorted((root / "Image-01-FPS" / clip).glob("*.jpg"))
        frames = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
                  for p in frame_paths]
        mean_frame = np.mean(frames, axis=0)
        rows.append(cv2.resize(mean_frame, (8, 8), interpolation=cv2.INTER_AREA).ravel())
    return np.stack(rows)


def read_split(root: Path, name: str):
    lines = (root / f"{name}.csv").read_text().split()
    clips, labels = zip(*(line.split(",") for line in lines))
    return list(clips), np.array(labels)


def probe_accuracies(features_by_split, labels_by_split, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    learners = {
        "logreg": LogisticRegression(C=1.0, max_iter=3000),
        "mlp": MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=600,
                             early_stopping=True, random_state=seed),
    }
    scores = {}
    for name, learner in learners.items():
        model = make_pipeline(StandardScaler(), learner)
        model.fit(features_by_split["train"], labels_by_split["train"])
        for split in ("val", "test"):
            accuracy = model.score(features_by_split[split], labels_by_split[split])
            scores[f"{name}_{split}"] = accuracy
    return scores


def parse_range(text: str):
    if text.lower() == "clean":
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"--audio-snr expects 'low,high' or 'clean', got '{text}'.")
    return (low, high)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio-snr", nargs="+", default=["clean", "0,10", "-5,5", "-10,0",
                                                           "-15,-5"],
                        help="SNR ranges 'low,high' in dB (or 'clean') to probe audio at")
    parser.add_argument("--visual-noise", nargs="+", type=float, default=[0.0, 0.4, 0.6, 0.8],
                        help="visual_noise_std values to probe vision at")
    parser.add_argument("--visual-occlusion", nargs="+", type=float, default=[0.0, 0.5],
                        help="visual_occlusion values to probe vision at")
    parser.add_argument("--seed", type=int, default=0, help="materialization and probe seed")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the materialized copies (default: a temporary one)")
    args = parser.parse_args(argv)
    # Run as a plain script from anywhere: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from datasets.avdigits import AVDigitsError, materialize, params_key

    audio_settings = [parse_range(text) for text in args.audio_snr]
    visual_settings = [(n, o) for o in args.visual_occlusion for n in args.visual_noise]
    # Pair the sweeps so that each materialization probes one audio and one visual setting.
    count = max(len(audio_settings), len(visual_settings))
    with tempfile.TemporaryDirectory() as default_scratch:
        scratch = args.scratch or Path(default_scratch)
        for step in range(count):
            snr = audio_settings[min(step, len(audio_settings) - 1)]
            noise, occlusion = visual_settings[min(step, len(visual_settings) - 1)]
            knobs = dict(seed=args.seed, audio_snr_db=snr, visual_noise_std=noise,
                         visual_occlusion=occlusion)
            started = time.perf_counter()
            try:
                root = materialize(scratch / f"avd-{params_key(**knobs)}", **knobs)
            except AVDigitsError as error:
                raise SystemExit(str(error))
            built_s = time.perf_counter() - started
            clips, labels = {}, {}
            for split in ("train", "val", "test"):
                clips[split], labels[split] = read_split(root, split)
            for modality, extract, setting in (
                    ("audio", audio_features, f"snr={snr}"),
                    ("visual", visual_features, f"noise={noise} occl={occlusion}")):
                if (modality == "audio" and step >= len(audio_settings)) or \
                        (modality == "visual" and step >= len(visual_settings)):
                    continue
                features = {split: extract(root, clips[split]) for split in clips}
                scores = probe_accuracies(features, labels, args.seed)
                print(f"{modality:6s} {setting:24s} " + " ".join(
                    f"{key}={value:.3f}" for key, value in scores.items())
                    + f"  (materialize {built_s:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
