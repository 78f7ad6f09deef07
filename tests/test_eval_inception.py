"""The FID Inception network: shapes with random weights, TF1 resize, sFID layout, weight loading."""

import os

import numpy as np
import pytest
import torch

from terdit.errors import TerditError
from terdit.eval.inception import (
    WEIGHTS_ENV,
    FIDInception,
    InceptionExtractor,
    _avg3,
    load_inception,
    prepare,
    spatial_features,
)
from terdit.eval.resize import tf1_resize_bilinear


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return prepare(FIDInception())


def _numpy_tf1_resize(img: np.ndarray, out_h: int, out_w: int, rows: int | None = None) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres) written as plain float32 loops;
    only the first `rows` output rows when given (the loops are slow)."""
    in_h, in_w = img.shape
    f32 = np.float32
    sy, sx = f32(in_h) / f32(out_h), f32(in_w) / f32(out_w)
    out = np.zeros((out_h, out_w), dtype=np.float32)
    for y in range(rows or out_h):
        fy = f32(y) * sy
        y0 = max(int(np.floor(fy)), 0)
        y1 = min(int(np.ceil(fy)), in_h - 1)
        ly = f32(fy - f32(np.floor(fy)))
        for x in range(out_w):
            fx = f32(x) * sx
            x0 = max(int(np.floor(fx)), 0)
            x1 = min(int(np.ceil(fx)), in_w - 1)
            lx = f32(fx - f32(np.floor(fx)))
            top = f32(img[y0, x0] + f32(f32(img[y0, x1] - img[y0, x0]) * lx))
            bottom = f32(img[y1, x0] + f32(f32(img[y1, x1] - img[y1, x0]) * lx))
            out[y, x] = f32(top + f32(f32(bottom - top) * ly))
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 13)), ((20, 9), (7, 4)), ((64, 48), (299, 299))])
def test_tf1_resize_matches_numpy_loops(in_hw, out_hw):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=in_hw).astype(np.float32)
    got = tf1_resize_bilinear(torch.from_numpy(img)[None, None], out_hw)[0, 0].numpy()
    rows = min(out_hw[0], 60)
    expected = _numpy_tf1_resize(img, *out_hw, rows=rows)[:rows]
    np.testing.assert_array_equal(got[:rows], expected)  # same float32 operations: bit-exact


def test_tf1_resize_is_not_half_pixel_bilinear():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    tf = tf1_resize_bilinear(img, 8)
    assert tf[0, 0, 0, 0] == 0 and tf[0, 0, 0, 1] == 0.5  # sample positions 0, 0.5, 1, ...
    half_pixel = torch.nn.functional.interpolate(img, size=8, mode="bilinear", align_corners=False)
    assert not torch.allclose(tf, half_pixel)


def test_layer_shapes_and_feature_dims(net):
    shapes = {}
    hooks = [getattr(net, name).register_forward_hook(
        lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
        for name in ("Conv2d_1a_3x3", "Mixed_5d", "Mixed_6d", "Mixed_6e", "Mixed_7c")]
    first_input = {}
    hooks.append(net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: first_input.setdefault("x", i[0])))
    images = np.random.default_rng(1).integers(0, 256, size=(1, 40, 50, 3), dtype=np.uint8)
    out = InceptionExtractor(net)(images)
    for h in hooks:
        h.remove()
    assert shapes == {"Conv2d_1a_3x3": (32, 149, 149), "Mixed_5d": (288, 35, 35), "Mixed_6d": (768, 17, 17),
                      "Mixed_6e": (768, 17, 17), "Mixed_7c": (2048, 8, 8)}
    dims = {k: v.shape for k, v in out.items()}
    assert dims == {"pool": (1, 2048), "spatial": (1, 2023), "logits": (1, 1008)}
    assert all(np.isfinite(v).all() for v in out.values())
    # ADM preprocessing: TF1 resize of the 0..255 image to 299, then (x - 128) / 128
    expected = (_numpy_tf1_resize(images[0, :, :, 2].astype(np.float32), 299, 299, rows=30)[:30] - 128) / 128
    np.testing.assert_allclose(first_input["x"][0, 2, :30].numpy(), expected, atol=1e-5)


def test_sfid_flattening_is_height_width_channel_order():
    h, w, c = 17, 17, 192
    t = torch.zeros(2, c, h, w)
    for ci in range(c):
        for hi in range(h):
            for wi in range(w):
                t[:, ci, hi, wi] = 10000 * hi + 100 * wi + ci
    flat = spatial_features(t)
    expected = [10000 * hi + 100 * wi + ci for hi in range(h) for wi in range(w) for ci in range(7)]
    assert flat.shape == (2, 2023)
    assert flat[1].tolist() == expected


def test_logits_have_no_bias_and_pools_follow_tf():
    net = FIDInception()
    assert net.fc.weight.shape == (1008, 2048) and net.fc.bias.shape == (1008,)
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool
    x = torch.ones(1, 3, 5, 5)
    assert torch.allclose(_avg3(x), x)  # padding is not counted in the average, as in TF


def test_state_dict_keys_follow_pytorch_fid_layout():
    keys = FIDInception().state_dict().keys()
    for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
              "Mixed_6a.branch3x3dbl_3.bn.bias", "Mixed_6d.branch1x1.conv.weight",
              "Mixed_7a.branch7x7x3_4.bn.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_mean", "fc.weight",
              "fc.bias"):
        assert k in keys


def _random_state(seed: int):
    torch.manual_seed(seed)
    return FIDInception().state_dict()  # default initialisation is random


def test_load_weights_in_either_layout(tmp_path, monkeypatch):
    state = _random_state(1)
    fid_style = dict(state)  # pytorch-fid style: torchvision BN counters, an aux head, a DataParallel prefix
    fid_style.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(0)
                      for k in state if k.endswith("running_var")})
    fid_style["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    fid_style = {f"module.{k}": v for k, v in fid_style.items()}
    torch.save(fid_style, tmp_path / "pt_inception.pth")
    loaded = load_inception(tmp_path / "pt_inception.pth")
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(v, state[k]), k
    plain = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # torch-fidelity layout
    torch.save(plain, tmp_path / "weights-inception.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights-inception.pth"))
    key = "Mixed_6d.branch1x1.conv.weight"
    assert torch.equal(load_inception().state_dict()[key], state[key])


def test_missing_or_bad_weights_raise_with_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(TerditError, match="--inception-weights.*TERDIT_INCEPTION_WEIGHTS"):
        load_inception()
    with pytest.raises(TerditError, match="nope.pth.*not found.*pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(TerditError, match="junk.pth: cannot read"):
        load_inception(junk)
    partial = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, partial)
    with pytest.raises(TerditError, match="partial.pth: not the FID Inception weights"):
        load_inception(partial)


def test_extractor_rejects_non_rgb(net):
    with pytest.raises(TerditError, match="x.npz.*--features digits"):
        InceptionExtractor(net).check_images((4, 8, 8, 1), "x.npz")


TF_GRAPH_ENV = "TERDIT_INCEPTION_TF_GRAPH"


def _tf_graph_features(graph_path: str, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """pool_3, mixed_6/conv and the unbiased logits of each image from the 2015-12-05 TF graph, fed the way
    ADM's evaluator feeds it: float32 0..255 NHWC remapped onto `ExpandDims:0`, so the graph's own resize and
    scaling run. The graph is imported once; images go one per run, which keeps its fixed batch-1 shapes
    valid."""
    tf = pytest.importorskip("tensorflow", reason="tensorflow is needed to run the reference TF graph")
    graph_def = tf.compat.v1.GraphDef()
    with open(graph_path, "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        batch = tf.compat.v1.placeholder(tf.float32, [1, None, None, 3])
        pool3, mixed_6, matmul = tf.import_graph_def(
            graph_def, input_map={"ExpandDims:0": batch},
            return_elements=["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul"], name="")
        pool = tf.reshape(pool3, [1, 2048])
        logits = tf.matmul(pool, matmul.inputs[1])  # ADM: the logits weight without the bias
        spatial = tf.reshape(mixed_6[..., :7], [1, -1])
    with tf.compat.v1.Session(graph=graph) as sess:
        runs = [sess.run({"pool": pool, "spatial": spatial, "logits": logits},
                         {batch: image[None].astype(np.float32)}) for image in images]
    return [{k: np.asarray(v) for k, v in got.items()} for got in runs]


@pytest.mark.skipif(not (os.environ.get(WEIGHTS_ENV) and os.environ.get(TF_GRAPH_ENV)),
                    reason=f"real Inception weights and the TF graph not both supplied (set {WEIGHTS_ENV} to the "
                           f".pth file and {TF_GRAPH_ENV} to ADM's classify_image_graph_def.pb)")
def test_real_weights_match_the_tf_graph():
    """The Done-when check of issue 4: features of fixed images within 1e-3 of the TF graph's."""
    from sklearn.datasets import load_sample_image

    ex = InceptionExtractor.from_weights()
    china = load_sample_image("china.jpg")
    images = [china[:256, :256], load_sample_image("flower.jpg")[:299, :299], china]
    for image, ref in zip(images, _tf_graph_features(os.environ[TF_GRAPH_ENV], images)):
        ours = ex(image[None])
        for name in ("pool", "spatial", "logits"):
            scale = float(np.abs(ref[name]).max())
            np.testing.assert_allclose(ours[name], ref[name], rtol=1e-3, atol=1e-3 * scale, err_msg=name)


@pytest.mark.skipif(not os.environ.get(WEIGHTS_ENV),
                    reason=f"real Inception weights not supplied (set {WEIGHTS_ENV} to the .pth file)")
def test_real_weights_features_do_not_depend_on_the_batch():
    """An image's features are the same alone or batched (batched convolutions must not mix images)."""
    from sklearn.datasets import load_sample_image

    ex = InceptionExtractor.from_weights()
    img = load_sample_image("china.jpg")[:256, :256]
    other = load_sample_image("flower.jpg")[:256, :256]
    alone = ex(img[None])
    batch = ex(np.stack([other, img]))
    assert np.isfinite(alone["pool"]).all() and (alone["pool"] >= 0).all()
    assert alone["logits"].argmax() == batch["logits"][1].argmax()
    np.testing.assert_allclose(alone["pool"][0], batch["pool"][1], rtol=1e-3, atol=1e-4)
