"""Train the digits CNN and write ``digits_cnn.onnx`` plus its test and calibration sets.

Offline only (needs scikit-learn, which ships the 8x8 digits data set, and onnx)::

    python -m splitter.models.train_digits            # writes next to this file
    python -m splitter.models.train_digits --out-dir /tmp/digits

Plain numpy with hand-written backprop: the net is tiny, so this takes seconds, and the
committed model can be rebuilt without torch. The graph is written with ``onnx.helper``
so its tensor names (``conv1`` … ``logits``) read well as cut points::

    image [N,1,8,8] → Conv 1→16 3x3 → Relu → Conv 16→32 3x3 → Relu → MaxPool 2x2
          → Flatten [N,512] → Gemm 512→64 → Relu → Gemm 64→10 → logits [N,10]

Files written:

* ``digits_cnn.onnx`` — opset 17, dynamic batch.
* ``digits_test.npz`` — the held-out split: ``image`` float32 [M,1,8,8] in [0,1] and
  ``label`` int64 [M]. ``label`` is the ground truth, not a model input.
* ``digits_calib.npz`` — ``image`` only: a stratified subset of the training split, the
  calibration data for static int8 quantization.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Params", "load_split", "train", "to_onnx", "main"]

F32 = npt.NDArray[np.float32]
SEED = 0
TEST_SIZE = 0.2
CALIB_SIZE = 256
HIDDEN = 64
CHANNELS = (16, 32)


@dataclass
class Params:
    w1: F32  # [16,1,3,3]
    b1: F32
    w2: F32  # [32,16,3,3]
    b2: F32
    w3: F32  # [512,64]  (Gemm B, not transposed)
    b3: F32
    w4: F32  # [64,10]
    b4: F32

    def items(self) -> list[tuple[str, F32]]:
        return list(vars(self).items())


def load_split() -> tuple[F32, npt.NDArray[np.int64], F32, npt.NDArray[np.int64]]:
    """The fixed-seed stratified train/test split, images scaled to [0,1], NCHW."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    return x_tr, y_tr, x_te, y_te


def _init(rng: np.random.Generator) -> Params:
    def he(shape: tuple[int, ...], fan_in: int) -> F32:
        scaled: F32 = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return scaled

    c1, c2 = CHANNELS
    flat = c2 * 4 * 4
    return Params(
        w1=he((c1, 1, 3, 3), 9), b1=np.zeros(c1, np.float32),
        w2=he((c2, c1, 3, 3), c1 * 9), b2=np.zeros(c2, np.float32),
        w3=he((flat, HIDDEN), flat), b3=np.zeros(HIDDEN, np.float32),
        w4=he((HIDDEN, 10), HIDDEN), b4=np.zeros(10, np.float32),
    )


def _im2col(x: F32) -> F32:
    """[N,C,H,W] → [N*H*W, C*9] for a 3x3 kernel, stride 1, padding 1."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(n * h * w, c * 9)


def _col2im(cols: F32, shape: tuple[int, ...]) -> F32:
    """Adjoint of :func:`_im2col`: scatter-add patch gradients back onto the input."""
    n, c, h, w = shape
    patches = cols.reshape(n, h, w, c, 3, 3)
    grad = np.zeros((n, c, h + 2, w + 2), np.float32)
    for i in range(3):
        for j in range(3):
            grad[:, :, i:i + h, j:j + w] += patches[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return grad[:, :, 1:-1, 1:-1]


def _conv(x: F32, w: F32, b: F32) -> tuple[F32, F32]:
    n, _, h, wd = x.shape
    cols = _im2col(x)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), cols


def _forward(p: Params, x: F32) -> tuple[F32, dict[str, Any]]:
    z1, cols1 = _conv(x, p.w1, p.b1)
    a1 = np.maximum(z1, 0)
    z2, cols2 = _conv(a1, p.w2, p.b2)
    a2 = np.maximum(z2, 0)
    n, c, h, w = a2.shape
    blocks = a2.reshape(n, c, h // 2, 2, w // 2, 2)
    pooled = blocks.max(axis=(3, 5))
    flat = pooled.reshape(n, -1)
    z3 = flat @ p.w3 + p.b3
    a3 = np.maximum(z3, 0)
    logits = a3 @ p.w4 + p.b4
    cache = dict(x=x, z1=z1, a1=a1, cols1=cols1, z2=z2, a2=a2, cols2=cols2, blocks=blocks,
                 pooled=pooled, flat=flat, z3=z3, a3=a3)
    return logits.astype(np.float32), cache


def _backward(p: Params, cache: dict[str, Any], dlogits: F32) -> Params:
    a3, flat = cache["a3"], cache["flat"]
    dw4, db4 = a3.T @ dlogits, dlogits.sum(0)
    dz3 = (dlogits @ p.w4.T) * (cache["z3"] > 0)
    dw3, db3 = flat.T @ dz3, dz3.sum(0)
    dpooled = (dz3 @ p.w3.T).reshape(cache["pooled"].shape)
    blocks = cache["blocks"]
    # Route the pool gradient to the max of each window; ties only occur between zeros
    # after the Relu, whose gradient the Relu mask drops anyway.
    mask = blocks == cache["pooled"][:, :, :, None, :, None]
    da2 = (mask * dpooled[:, :, :, None, :, None]).reshape(cache["a2"].shape)
    dz2 = da2 * (cache["z2"] > 0)
    dz2_flat = dz2.transpose(0, 2, 3, 1).reshape(-1, p.w2.shape[0])
    dw2 = (dz2_flat.T @ cache["cols2"]).reshape(p.w2.shape)
    db2 = dz2_flat.sum(0)
    da1 = _col2im(dz2_flat @ p.w2.reshape(p.w2.shape[0], -1), cache["a1"].shape)
    dz1 = da1 * (cache["z1"] > 0)
    dz1_flat = dz1.transpose(0, 2, 3, 1).reshape(-1, p.w1.shape[0])
    dw1 = (dz1_flat.T @ cache["cols1"]).reshape(p.w1.shape)
    db1 = dz1_flat.sum(0)
    return Params(w1=dw1, b1=db1, w2=dw2, b2=db2, w3=dw3, b3=db3, w4=dw4, b4=db4)


def predict(p: Params, x: F32) -> F32:
    return _forward(p, x)[0]


def train(x: F32, y: npt.NDArray[np.int64], *, epochs: int = 40, batch: int = 32,
          lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = SEED) -> Params:
    """Adam on softmax cross-entropy; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    p = _init(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        # Cosine decay: the last epochs settle instead of bouncing around the minimum.
        rate = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            logits, cache = _forward(p, x[idx])
            shifted = logits - logits.max(1, keepdims=True)
            probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
            probs[np.arange(len(idx)), y[idx]] -= 1
            grads = _backward(p, cache, (probs / len(idx)).astype(np.float32))
            step += 1
            for name, g in grads.items():
                g = g + weight_decay * getattr(p, name)
                m[name] = beta1 * m[name] + (1 - beta1) * g
                v[name] = beta2 * v[name] + (1 - beta2) * g * g
                m_hat = m[name] / (1 - beta1**step)
                v_hat = v[name] / (1 - beta2**step)
                update = rate * m_hat / (np.sqrt(v_hat) + eps)
                setattr(p, name, (getattr(p, name) - update).astype(np.float32))
    return p


def to_onnx(p: Params) -> Any:
    """The trained net as an opset-17 ModelProto with a dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(arr, name) for name, arr in p.items()]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["conv1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool"], name="pool",
                         kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["relu3"], name="relu3"),
        helper.make_node("Gemm", ["relu3", "w4", "b4"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="splitinfer.train_digits")
    model.ir_version = 8  # the IR that opset 17 shipped with: loads on older runtimes too
    helper.set_model_props(model, {"dataset": "sklearn.datasets.load_digits",
                                   "input_range": "[0,1] (pixel/16)"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _calibration_subset(x: F32, y: npt.NDArray[np.int64]) -> F32:
    from sklearn.model_selection import train_test_split

    subset, _, _, _ = train_test_split(x, y, train_size=CALIB_SIZE, stratify=y,
                                       random_state=SEED)
    return np.ascontiguousarray(subset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime as ort

    x_tr, y_tr, x_te, y_te = load_split()
    params = train(x_tr, y_tr, epochs=args.epochs)
    model = to_onnx(params)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out / "digits_cnn.onnx")
    np.savez_compressed(out / "digits_test.npz", image=x_te, label=y_te)
    np.savez_compressed(out / "digits_calib.npz", image=_calibration_subset(x_tr, y_tr))

    # Score through onnxruntime, the way the tests and the services run it.
    session = ort.InferenceSession(str(out / "digits_cnn.onnx"),
                                   providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"image": x_te})[0]
    drift = float(np.abs(ort_logits - predict(params, x_te)).max())
    train_acc = float((predict(params, x_tr).argmax(1) == y_tr).mean())
    test_acc = float((ort_logits.argmax(1) == y_te).mean())
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f} "
          f"({len(y_te)} images)  numpy-vs-onnxruntime max diff {drift:.2e}")
    print(f"wrote {out / 'digits_cnn.onnx'}, digits_test.npz, digits_calib.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
