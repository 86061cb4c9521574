"""Linear / MLP probes per modality on AV-Digits, to see where the noise knobs sit.

For each noise setting it materializes AV-Digits into a scratch folder, trains
scikit-learn classifiers on train and reports val/test accuracy per modality:
audio on time-pooled log-mel statistics (shift-invariant, since the word sits at
a random offset), vision on the frames averaged and pooled back to 8x8. These are
weaker learners than the training job's CNNs, so treat the numbers as lower bounds.

    python benchmarks/avdigits_probe.py
    python benchmarks/avdigits_probe.py --learner cnn --audio-snr=-10,0 --visual-noise 0.6 0.8
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
        rows.append(np.log(mel + 1e-6).astype(np.float32))
    return np.stack(rows)                                   # (N, 40 mels, 101 steps)


def visual_features(root: Path, clips):
    import cv2

    rows = []
    for clip in clips:
        frame_paths = sorted((root / "Image-01-FPS" / clip).glob("*.jpg"))
        frames = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
                  for p in frame_paths]
        rows.append(np.stack(frames))
    return np.stack(rows)                                   # (N, frames, H, W)


def flat_features(modality: str, maps):
    """Shift-invariant log-mel statistics, or the mean frame pooled back to 8x8."""
    import cv2

    if modality == "audio":
        return np.concatenate([maps.mean(2), maps.std(2), maps.max(2)], axis=1)
    return np.stack([cv2.resize(clip.mean(0), (8, 8), interpolation=cv2.INTER_AREA).ravel()
                     for clip in maps])


def read_split(root: Path, name: str):
    lines = (root / f"{name}.csv").read_text().split()
    clips, labels = zip(*(line.split(",") for line in lines))
    return list(clips), np.array(labels)


def sklearn_accuracies(modality, maps_by_split, labels_by_split, seed: int) -> dict:
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
        features = {split: flat_features(modality, maps) for split, maps in maps_by_split.items()}
        model.fit(features["train"], labels_by_split["train"])
        for split in ("val", "test"):
            accuracy = model.score(features[split], labels_by_split[split])
            scores[f"{name}_{split}"] = accuracy
    return scores


def cnn_accuracies(modality, maps_by_split, labels_by_split, seed: int, epochs: int) -> dict:
    """A 4-layer CNN like the prototype's; vision folds frames into the batch and averages."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    classes = sorted(set(labels_by_split["train"]))

    def tensors(split):
        maps = torch.from_numpy(maps_by_split[split])
        maps = maps.unsqueeze(1) if modality == "audio" else maps   # (N, 1 | frames, H, W)
        targets = torch.tensor([classes.index(label) for label in labels_by_split[split]])
        return maps, targets

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                             nn.ReLU(), nn.MaxPool2d(2))

    encoder = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(64, len(classes))

    def logits(maps):
        batch, views = maps.shape[:2]
        features = encoder(maps.reshape(batch * views, 1, *maps.shape[2:]))
        return head(features.reshape(batch, views, -1).mean(1))

    train_x, train_y = tensors("train")
    mean, std = train_x.mean(), train_x.std()
    evaluation = {split: tensors(split) for split in ("val", "test")}
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    best_val, scores = -1.0, {}
    for _ in range(epochs):
        encoder.train()
        for batch in torch.randperm(len(train_y)).split(64):
            loss = nn.functional.cross_entropy(logits((train_x[batch] - mean) / std),
                                               train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        encoder.eval()
        with torch.no_grad():
            epoch = {split: (logits((x - mean) / std).argmax(1) == y).float().mean().item()
                     for split, (x, y) in evaluation.items()}
        if epoch["val"] > best_val:
            best_val = epoch["val"]
            scores["cnn_bestval_test"] = epoch["test"]
        scores["cnn_last_val"], scores["cnn_last_test"] = epoch["val"], epoch["test"]
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
    parser.add_argument("--audio-snr", action="append", default=None,
                        help="an SNR range 'low,high' in dB or 'clean' to probe audio at; "
                             "repeat the flag, write negatives as --audio-snr=-10,0 "
                             "(default: clean, 0..10, -5..5, -10..0, -15..-5)")
    parser.add_argument("--visual-noise", nargs="+", type=float, default=[0.0, 0.4, 0.6, 0.8],
                        help="visual_noise_std values to probe vision at")
    parser.add_argument("--visual-occlusion", nargs="+", type=float, default=[0.0, 0.5],
                        help="visual_occlusion values to probe vision at")
    parser.add_argument("--learner", choices=("sklearn", "cnn"), default="sklearn",
                        help="sklearn: logistic regression + MLP on flat features "
                             "(fast); cnn: a small CNN like the training job's")
    parser.add_argument("--epochs", type=int, default=15, help="CNN training epochs")
    parser.add_argument("--seed", type=int, default=0, help="materialization and probe seed")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the materialized copies (default: a temporary one)")
    args = parser.parse_args(argv)
    # Run as a plain script from anywhere: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from datasets.avdigits import AVDigitsError, materialize, params_key

    snr_texts = args.audio_snr or ["clean", "0,10", "-5,5", "-10,0", "-15,-5"]
    audio_settings = [parse_range(text) for text in snr_texts]
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
                if args.learner == "cnn":
                    scores = cnn_accuracies(modality, features, labels, args.seed, args.epochs)
                else:
                    scores = sklearn_accuracies(modality, features, labels, args.seed)
                print(f"{modality:6s} {setting:24s} " + " ".join(
                    f"{key}={value:.3f}" for key, value in scores.items())
                    + f"  (materialize {built_s:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
