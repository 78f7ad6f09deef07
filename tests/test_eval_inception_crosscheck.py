"""Our FID Inception against an independent port: torch-fidelity's FeatureExtractorInceptionV3.

torch-fidelity reports its pool_3 features within 1e-4 relative of the TF graph's and its FID within 1e-6
(evaluation-facts §2). Loading the same weights file into both ports and comparing pool, logits and the sFID
map checks the architecture, the TF1 resize, the (x - 128) / 128 scaling, the key mapping and ADM's sFID
layout at once, with no download: the weights are random but calibrated so that every layer carries
unit-scale activations (with PyTorch's default initialisation they shrink to ~1e-7 and any comparison passes).
When the real weights are supplied ($TERDIT_INCEPTION_WEIGHTS), the same comparison runs on them too.

torch-fidelity's package __init__ imports torchvision (for datasets and other extractors), which has no CPU
wheel for this torch; the test loads only the Inception module, so install it with
`pip install --no-deps torch-fidelity==0.4.0` (the README's test command does).
"""

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

from terdit.eval.inception import WEIGHTS_ENV, FIDInception, InceptionExtractor, load_inception

FIDELITY = "torch_fidelity"
INSTALL_HINT = "pip install --no-deps torch-fidelity==0.4.0"


def _fidelity_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3, imported without running the package __init__."""
    if FIDELITY not in sys.modules:
        spec = importlib.util.find_spec(FIDELITY)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"torch-fidelity is not installed, so there is no second port to compare with "
                        f"({INSTALL_HINT})")
        package = types.ModuleType(FIDELITY)
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[FIDELITY] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def _test_images() -> list[np.ndarray]:
    """Fixed RGB images: photograph crops up-sampled to 299, already 299 and down-sampled, and random noise."""
    from sklearn.datasets import load_sample_image

    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    return [china[:256, :256], flower[40:339, 100:399], china[100:420, 50:620], noise]


def _calibrated_random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random convolutions and BatchNorm affines; running statistics taken from one batch (momentum None
    makes them the batch's own), so every layer normalises to unit scale as trained weights roughly do."""
    torch.manual_seed(seed)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
            m.momentum = None
            m.reset_running_stats()
    torch.nn.init.normal_(net.fc.weight, 0.0, 0.05)
    images = np.stack([np.asarray(_resized(img)) for img in _test_images()])
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def _resized(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img).resize((128, 128))


def _both_ports(weights_path: str):
    ours = InceptionExtractor(load_inception(weights_path))
    theirs = _fidelity_inception_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=weights_path)
    theirs.eval()
    return ours, theirs


def _theirs(theirs, image: np.ndarray) -> dict[str, np.ndarray]:
    tap: list[torch.Tensor] = []
    hook = theirs.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: tap.append(out))
    try:
        with torch.no_grad():
            pool, logits = theirs(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].contiguous())
    finally:
        hook.remove()
    spatial = tap[0][:, :7].permute(0, 2, 3, 1).reshape(1, -1)  # written out here from ADM's description
    return {"pool": pool.numpy(), "logits": logits.numpy(), "spatial": spatial.numpy()}


def _assert_ports_agree(ours, theirs) -> None:
    for image in _test_images():
        got, want = ours(image[None]), _theirs(theirs, image)
        for name in ("pool", "logits", "spatial"):
            scale = float(np.abs(want[name]).max())
            assert scale > 0.05, f"{name}: activations too small ({scale}) for the comparison to mean anything"
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale, err_msg=name)


@pytest.fixture(scope="module")
def random_ports(tmp_path_factory):
    """Both ports loaded from one file of calibrated random weights, built once for this module."""
    _fidelity_inception_class()  # skip early, before building weights, when the second port is absent
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(_calibrated_random_weights(0), path)
    return _both_ports(str(path))


def test_matches_torch_fidelity_with_calibrated_random_weights(random_ports):
    _assert_ports_agree(*random_ports)


def test_crosscheck_is_sensitive_to_a_wrong_resize(random_ports):
    """The comparison above must be able to fail: half-pixel resizing (torch's default) is a known porting
    bug and has to show up as a mismatch."""
    ours, theirs = random_ports
    image = _test_images()[0]
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        wrong = ours.net(x)[0].numpy()  # 299x299 input: the net's own resize is the identity
    want = _theirs(theirs, image)["pool"]
    assert np.abs(wrong - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.skipif(not os.environ.get(WEIGHTS_ENV),
                    reason=f"real Inception weights not supplied (set {WEIGHTS_ENV} to the .pth file)")
def test_matches_torch_fidelity_with_real_weights():
    _assert_ports_agree(*_both_ports(os.environ[WEIGHTS_ENV]))
