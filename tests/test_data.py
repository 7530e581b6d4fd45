import json

import numpy as np
import pytest
import torch

from detkd.config import SyntheticConfig
from detkd.data.coco import read_coco
from detkd.data.dataset import DetectionDataset, EpochSampler
from detkd.data.synthetic import generate_dataset, render_image
from detkd.data.transforms import hflip
from detkd.errors import DataError

from conftest import write_coco

SMALL = SyntheticConfig(num_train=6, num_val=4, image_size=64, max_object_size=40.0, max_objects=6)


def test_generator_is_deterministic(tmp_path):
    generate_dataset(tmp_path / "a", SMALL, seed=3)
    generate_dataset(tmp_path / "b", SMALL, seed=3)
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000002.png", "val/000003.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    generate_dataset(tmp_path / "c", SMALL, seed=4)
    assert (tmp_path / "a/train/000002.png").read_bytes() != (tmp_path / "c/train/000002.png").read_bytes()


def test_generator_content_covers_the_hard_cases():
    cfg = SyntheticConfig(image_size=128)
    sides, empty, overlaps = [], 0, 0
    for i in range(60):
        pixels, objects = render_image(cfg, 0, "train", i)
        assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
        empty += not objects
        boxes = [o["bbox"] for o in objects]
        for x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
            sides.append((w * h) ** 0.5)
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (x0, y0, w0, h0), (x1, y1, w1, h1) = boxes[a], boxes[b]
                overlaps += min(x0 + w0, x1 + w1) > max(x0, x1) and min(y0 + h0, y1 + h1) > max(y0, y1)
        for o in objects:  # visible area never below (1 - max_occlusion) of... at least something visible
            assert o["area"] > 0
    assert min(sides) < 16 and max(sides) > 40
    assert empty >= 1 and overlaps >= 1


def test_synthetic_category_ids_are_non_contiguous(tmp_path):
    generate_dataset(tmp_path, SMALL, seed=0)
    cats = json.loads((tmp_path / "annotations/instances_train.json").read_text())["categories"]
    assert [c["id"] for c in cats] == [1, 3, 5, 7][: SMALL.num_classes]


def test_reader_maps_ids_and_applies_policies(coco_like):
    ann, image_dir = coco_like
    index = read_coco(ann, image_dir)
    assert index.category_ids == [1, 7, 90] and index.category_names == ["person", "train", "toothbrush"]
    by_id = {r.image_id: r for r in index.images}
    assert by_id[10].labels.tolist() == [3, 2]  # 90 -> 3, 7 -> 2; the crowd box is not a training target
    np.testing.assert_allclose(by_id[10].boxes[1], [50, 30, 60, 40])  # clipped to the 60x40 image
    assert by_id[11].labels.tolist() == [2]  # the zero-width box was dropped
    assert len(by_id[12].labels) == 0 and by_id[12].boxes.shape == (0, 4)
    assert index.stats["crowd"] == 1 and index.stats["degenerate_dropped"] == 1 and index.stats["clipped"] == 1
    image, target = DetectionDataset(index)[1]  # the grayscale image comes out as RGB
    assert image.shape == (3, 50, 50) and target["boxes"].shape == (1, 4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "negative width or height"),
        (lambda d: d["annotations"][0].update(bbox=[100, 2, 3, 4]), "entirely outside image 10"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "4 finite numbers"),
        (lambda d: d["annotations"][0].update(category_id=5), r"unknown category_id 5; known ids: \[1, 7, 90\]"),
        (lambda d: d["annotations"][0].update(image_id=99), "image_id 99 is not in 'images'"),
        (lambda d: d["images"][0].update(file_name="../../etc/passwd"), "outside the image directory"),
        (lambda d: d["images"][0].update(file_name="missing.png"), "image file not found"),
        (lambda d: d["images"][0].update(width=0), "'width' must be a positive integer"),
        (lambda d: d.pop("categories"), "missing or non-list key 'categories'"),
    ],
)
def test_reader_rejects_bad_annotations_with_one_line(coco_like, mutate, message):
    ann, image_dir = coco_like
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as info:
        read_coco(ann, image_dir)
    assert "\n" not in str(info.value) and str(ann) in str(info.value)


def test_reader_missing_and_malformed_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        read_coco(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(line 1"):
        read_coco(bad, tmp_path)


@pytest.mark.fault
def test_unreadable_image_is_named(coco_like):
    ann, image_dir = coco_like
    (image_dir / "a.png").write_bytes(b"this is not a png")
    dataset = DetectionDataset(read_coco(ann, image_dir))
    with pytest.raises(DataError, match=r"a.png: cannot read image"):
        dataset[0]


def test_hflip_moves_boxes():
    image = torch.zeros(3, 10, 20)
    image[:, 2:4, 1:5] = 1.0  # an object at x in [1, 5), y in [2, 4)
    boxes = torch.tensor([[1.0, 2.0, 5.0, 4.0]])
    flipped, fboxes = hflip(image, boxes)
    assert fboxes.tolist() == [[15.0, 2.0, 19.0, 4.0]]
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert xs.min().item() == 15 and xs.max().item() == 18  # pixels moved exactly where the box says
    again, back = hflip(flipped, fboxes)
    assert torch.equal(again, image) and torch.equal(back, boxes)


def test_sampler_is_deterministic_resumable_and_sharded():
    a = list(EpochSampler(10, seed=1, hflip_p=0.5))
    assert a == list(EpochSampler(10, seed=1, hflip_p=0.5))
    s = EpochSampler(10, seed=1, hflip_p=0.5)
    s.set_epoch(0, skip=4)
    assert list(s) == a[4:]
    s.set_epoch(1)
    assert list(s) != a
    shards = [list(EpochSampler(10, seed=1, rank=r, world=3)) for r in range(3)]
    assert all(len(x) == 4 for x in shards)
    assert {i for shard in shards for i, _ in shard} == set(range(10))


def test_dev_split_is_carved_from_train_by_seed(tmp_path):
    """dev and fit partition train's images, the draw follows the seed, 0 carves nothing, and a fraction
    that leaves an empty side is refused naming the key."""
    from detkd.config import DataConfig
    from detkd.data.dataset import open_split
    from detkd.data.prepare import prepare_dataset
    from detkd.errors import DataError

    data = DataConfig.model_validate({"synthetic": {"num_train": 10, "num_val": 2}, "dev_fraction": 0.3})
    ids = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_dataset(tmp_path / name, data, seed)
        dev = {r.image_id for r in open_split(tmp_path / name, "dev").images}
        fit = {r.image_id for r in open_split(tmp_path / name, "fit").images}
        train = {r.image_id for r in open_split(tmp_path / name, "train").images}
        assert len(dev) == 3 and not dev & fit and dev | fit == train
        ids[name] = dev
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    manifest = prepare_dataset(tmp_path / "none", data.model_copy(update={"dev_fraction": 0.0}), 0)
    assert set(manifest["splits"]) == {"train", "val"}
    with pytest.raises(DataError, match=r"data.dev_fraction 0.01: leaves 0 of the 10 train images for dev"):
        prepare_dataset(tmp_path / "tiny", data.model_copy(update={"dev_fraction": 0.01}), 0)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.fault
def test_prepared_directory_gets_the_usual_permissions(tmp_path):
    """The data directory is built in a private temporary directory (0700) and published with the mode
    any new directory gets (umask applied), so other users and services can read it."""
    import os

    from detkd.config import parse_params
    from detkd.data.prepare import prepare_dataset
    from detkd.io import current_umask

    params = parse_params({"data": {"synthetic": {"num_train": 4, "num_val": 2, "image_size": 32,
                                                  "max_object_size": 12.0, "max_objects": 2, "num_classes": 2}}})
    prepare_dataset(tmp_path / "prepared", params.data, 0)
    assert os.stat(tmp_path / "prepared").st_mode & 0o777 == 0o777 & ~current_umask()


@pytest.mark.fault
def test_training_images_of_16_bits_and_with_alpha_read_as_displayed(tmp_path):
    """The training reader shares deploy's pixel rule (detkd.pixels): 16-bit greyscale keeps its range
    instead of saturating to white; transparency is composited over white; 8-bit RGB is unchanged."""
    import numpy as np
    from PIL import Image

    from detkd.data.dataset import read_image

    grey16 = (np.arange(6 * 5).reshape(6, 5) * 2000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = np.asarray(read_image(tmp_path / "g16.png"))
    assert out.shape == (6, 5, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == round(29 * 2000 * 255 / 65535)
    rgb = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "rgb.png")), rgb)
    rgba = np.dstack([rgb, np.zeros((6, 5), np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (np.asarray(read_image(tmp_path / "clear.png")) == 255).all()
