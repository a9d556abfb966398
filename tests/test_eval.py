"""Frozen-feature evaluation: weighted kNN, the linear probe, feature extraction and ``mae-fast eval``."""

import pytest
import torch
from train_helpers import TINY, quick_run_config

from mae_fast.cli import main
from mae_fast.train import TrainConfig, pretrain
from mae_fast.train.eval import extract_features, knn_accuracy, linear_probe_accuracy
from mae_fast.train.runmodel import build_model, model_from_checkpoint


def _clusters(n_per_class, classes=4, dim=16, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return feats, labels


def test_knn_separable_clusters_and_chance_level():
    train, test = _clusters(30, seed=0), _clusters(10, seed=0)
    test = (test[0] + 0.1 * torch.randn_like(test[0]), test[1])
    assert knn_accuracy(train, test, k=5) == 1.0
    shuffled = (train[0], train[1][torch.randperm(len(train[1]))])
    assert knn_accuracy(shuffled, test, k=5) < 0.6
    with pytest.raises(ValueError, match="k must be in"):
        knn_accuracy(train, test, k=0)


def test_knn_weighted_vote_by_hand():
    train_feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.02]])
    # k=2: neighbours 0 (label 0, sim ~1) and 1 (label 1, sim ~0.995): the closer one wins the weighted vote
    assert knn_accuracy((train_feats, train_labels), (query, torch.tensor([0])), k=2) == 1.0
    # k=3 adds the far label-1 point: two label-1 votes (exp(0.99/T) + exp(0.02/T)) vs one exp(1/T)
    sims = torch.nn.functional.normalize(train_feats, dim=1) @ torch.nn.functional.normalize(query, dim=1)[0]
    votes1 = (sims[1] / 0.07).exp() + (sims[2] / 0.07).exp()
    expected = 1.0 if (sims[0] / 0.07).exp() > votes1 else 0.0
    assert knn_accuracy((train_feats, train_labels), (query, torch.tensor([0])), k=3) == expected


def test_linear_probe_learns_separable_features():
    train, test = _clusters(40, seed=1), _clusters(10, seed=1)
    assert linear_probe_accuracy(train, test, epochs=10, batch_size=64, lr=3e-2) >= 0.95
    with pytest.raises(ValueError, match="epochs must be positive"):
        linear_probe_accuracy(train, test, epochs=0)


def test_features_mean_and_cls_pooling():
    config = TrainConfig(model_kwargs=TINY, device="cpu").validate()
    model = build_model(config, torch.device("cpu"))
    from mae_fast.train.data import FashionMNISTSubset

    source = FashionMNISTSubset("test")
    mean_feats, labels = extract_features(model, source, "mean", batch_size=8, limit=10)
    cls_feats, _ = extract_features(model, source, "cls", batch_size=8, limit=10)
    assert mean_feats.shape == (10, 32) and cls_feats.shape == (10, 32) and labels.shape == (10,)
    from mae_fast.train.data import eval_batches

    imgs, _ = next(eval_batches(source, 28, 10))
    tokens = model.encode(imgs)
    torch.testing.assert_close(mean_feats, tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(cls_feats, tokens[:, 0])
    with pytest.raises(ValueError, match="pool must be one of"):
        extract_features(model, source, "max")


def test_eval_cli_on_a_pretrained_export(tmp_path, capsys):
    result = pretrain(quick_run_config(tmp_path / "run", max_steps=2))
    model, loaded = model_from_checkpoint(result.export)
    assert loaded.model_kwargs == TINY and model.in_chans == 1 and model.img_size == (28, 28)
    fresh, _ = model_from_checkpoint(result.export, random_init=True)
    reference = build_model(TrainConfig(model_kwargs=TINY, device="cpu"), torch.device("cpu"))
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    args = ["eval", "knn", result.export, "--k", "3", "--train-limit", "40", "--test-limit", "20", "--random-init"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("knn top-1 (mean-pooled features, fashion-mnist), pretrained: ")
    assert lines[1].startswith("knn top-1 (mean-pooled features, fashion-mnist), random init: ")
    assert 0.0 <= float(lines[0].rsplit(" ", 1)[1]) <= 1.0
    assert (
        main(["eval", "linprobe", result.checkpoint, "--epochs", "1", "--train-limit", "40", "--test-limit", "20"]) == 0
    )
    assert "linprobe top-1" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        model_from_checkpoint(str(tmp_path / "missing.pth"))


def test_eval_cli_names_a_missing_or_unreadable_checkpoint_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^mae-fast eval: checkpoint not found: .*missing\.pth$"):
        main(["eval", "knn", str(tmp_path / "missing.pth")])
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit, match=r"^mae-fast eval: .*broken\.pth is not a readable mae_fast/release"):
        main(["eval", "knn", str(broken)])
