"""Face identity network (InceptionResnetV1 from a local file) and MTCNN on a real photograph."""

from __future__ import annotations

import pytest
import torch
from facenet_pytorch import InceptionResnetV1, fixed_image_standardization

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models import FaceIdentity, load_face


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random-weights state dict in the layout of facenet-pytorch's VGGFace2 release
    (the classifier 'logits.*' keys included)."""
    torch.manual_seed(0)
    net = InceptionResnetV1(classify=True, num_classes=7).eval()
    path = tmp_path_factory.mktemp("face") / "vggface2_random.pt"
    torch.save(net.state_dict(), path)
    return str(path), net


@pytest.fixture(scope="module")
def face(weights_file):
    return load_face(weights_file[0], crop="celeba_hq")


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float()
    return (img / 127.5 - 1)[None]  # [1,3,512,512] in [-1,1]


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="the face loss needs --face-weights PATH"):
        load_face(None)
    with pytest.raises(InputFileError, match="no such file"):
        load_face(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(InputFileError, match="do not fit InceptionResnetV1") as e:
        load_face(str(bad))
    assert "\n" not in str(e.value)


def test_loaded_frozen_and_equal_to_saved(face, weights_file):
    _, original = weights_file
    assert not face.net.training and all(not p.requires_grad for p in face.net.parameters())
    assert torch.equal(face.net.last_linear.weight, original.last_linear.weight)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    emb = face.embed(x)
    assert emb.shape == (2, 512)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # facenet's own input standardisation on the 0..255 pixels of the crop
    crops = face.crop_faces(x)
    original.classify = False
    with torch.no_grad():
        expected = original(fixed_image_standardization((crops + 1) * 127.5))
    assert (emb - expected).abs().max().item() < 1e-4


def test_gradient_reaches_input(face):
    x = (torch.rand(1, 3, 256, 256) * 2 - 1).requires_grad_(True)
    ref = face.embed(torch.zeros(1, 3, 256, 256)).detach()
    loss = 1 - (face.embed(x) * ref).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in face.net.parameters())


def test_celeba_hq_crop_geometry(face):
    """Only the official crop x[:, :, 35:223, 32:220] of a 256 image reaches the network."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    outside = x.clone()
    mask = torch.ones(256, 256, dtype=torch.bool)
    mask[35:223, 32:220] = False
    outside[:, :, mask] = torch.rand(int(mask.sum()), generator=g) * 2 - 1
    inside = x.clone()
    inside[:, :, 100:150, 100:150] = -1.0
    e = face.embed(torch.cat([x, outside, inside]))
    assert (e[0] - e[1]).abs().max().item() < 1e-4
    assert (e[0] - e[2]).abs().max().item() > 1e-3
    assert face.crop_faces(x).shape == (1, 3, 160, 160)


def test_mtcnn_detects_the_astronaut(face, astronaut):
    boxes = face.detect(torch.cat([astronaut, torch.zeros_like(astronaut)]))
    x1, y1, x2, y2 = boxes[0].tolist()
    # Eileen Collins' face in scikit-image's astronaut photograph (512x512)
    assert 150 < x1 < 210 and 30 < y1 < 95 and 240 < x2 < 300 and 140 < y2 < 200, boxes[0]
    assert torch.isnan(boxes[1]).all()  # a blank image: no face
    emb = face.embed(torch.cat([astronaut, astronaut]), boxes=boxes)  # NaN row -> the fixed crop
    assert emb.shape == (2, 512) and torch.isfinite(emb).all()
    whole = FaceIdentity(face.net, crop="full")
    assert (whole.embed(astronaut, boxes[:1]) - emb[:1]).abs().max().item() < 1e-5
