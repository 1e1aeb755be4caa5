"""Class subsets (config.data.classes) on the tiny Fashion-MNIST-format set.

The tiny set (conftest) has 10 classes, 16 training and 4 test images each;
an image's class is where its bright square sits, so every test checks the
remapped label against the image itself, not only against other labels.
"""

import collections

import numpy as np
import pytest

from vgg_jax import checkpointing
from vgg_jax import datasets
from vgg_jax import input_pipeline
from vgg_jax import train
from vgg_jax.datasets import fashion_mnist
from vgg_jax.datasets import subsets

NAMES = fashion_mnist.CLASS_NAMES
SIDE = 32  # tiny images (28 px) are read whole, rescaled to 32 x 32


def _subset_config(config, classes):
  config.data.classes = classes
  config.input.scale_min = config.input.scale_max = SIDE
  config.input.crop_size = SIDE
  config.input.random_flip = False  # keeps the square where its class says
  config.input.pca_sigma = 0.0
  return config


def _image_class(image):
  """The class whose square (conftest.learnable_images) is bright."""
  scale = SIDE / 28
  means = []
  for c in range(10):
    r, q = divmod(c, 5)
    rows = slice(int((2 + 12 * r) * scale) + 1, int((12 + 12 * r) * scale) - 1)
    cols = slice(int((1 + 5 * q) * scale) + 1, int((6 + 5 * q) * scale) - 1)
    means.append(image[rows, cols, 0].mean())
  return int(np.argmax(means))


def _check_labels_match_images(batch, classes, mask=None):
  mask = np.ones(len(batch['label']), bool) if mask is None else mask
  for image, label in zip(batch['image'][mask], batch['label'][mask]):
    assert 0 <= label < len(classes)
    want = classes[label]
    assert _image_class(image) == (want if isinstance(want, int)
                                   else NAMES.index(want))


def _all_labels(config, split):
  """Every record's dataset label, read record by record (no subset)."""
  builder = datasets.get_builder('fashion_mnist', data_dir=config.data.data_dir,
                                 manual_dir=config.data.manual_dir)
  info = datasets.dataset_info(builder)
  source = datasets.data_source(builder, split, info)
  return np.array([int(source[i]['label']) for i in range(len(source))])


@pytest.mark.parametrize('classes', [('Bag', 'T-shirt/top', 'Coat'),
                                     (8, 0, 4), ['Bag', 0, np.int64(4)]])
def test_dataset_info_of_a_subset(tiny_config, classes):
  info = input_pipeline.get_dataset_info(_subset_config(tiny_config, classes))
  assert info.num_classes == 3
  assert info.class_names == ('Bag', 'T-shirt/top', 'Coat')
  assert info.num_examples == {'train': 48, 'test': 12}
  assert info.source_labels == (8, 0, 4)


def test_no_subset_means_every_class(tiny_config):
  whole = input_pipeline.get_dataset_info(tiny_config)  # no field at all
  for empty in ((), [], None):
    info = input_pipeline.get_dataset_info(_subset_config(tiny_config, empty))
    assert info == whole
  assert whole.num_classes == 10 and whole.class_names == NAMES
  assert whole.num_examples == {'train': 160, 'test': 40}
  assert whole.source_labels is None
  batches = list(input_pipeline.create_eval_iterator(
      tiny_config, scale=SIDE, mode='center_crop'))
  seen = np.concatenate([b['index'][b['mask']] for b in batches])
  assert sorted(seen) == list(range(40))
  _check_labels_match_images(
      {k: np.concatenate([b[k] for b in batches]) for k in ('image', 'label')},
      tuple(range(10)), np.concatenate([b['mask'] for b in batches]))


def test_train_iterator_reads_only_the_subset_remapped(tiny_config):
  classes = ('Sneaker', 'Trouser', 'Bag', 'Dress', 'Shirt')  # 80 images
  config = _subset_config(tiny_config, classes)
  iterator = input_pipeline.create_train_iterator(config)
  epochs = [[next(iterator) for _ in range(5)] for _ in range(2)]  # batch 16
  iterator.close()
  for batches in epochs:
    labels = np.concatenate([b['label'] for b in batches])
    # Each epoch holds every subset image once: 16 of each class.
    assert collections.Counter(labels.tolist()) == {j: 16 for j in range(5)}
    images = {b['image'][i].tobytes() for b in batches for i in range(16)}
    assert len(images) == 80
    for batch in batches:
      _check_labels_match_images(batch, classes)
  # The second epoch is the same images in another order.
  first, second = ([b['image'] for b in e] for e in epochs)
  assert not all(np.array_equal(a, b) for a, b in zip(first, second))


def test_subset_shards_are_disjoint_and_resume_exactly(tiny_config):
  classes = (3, 7, 1)  # 48 training images, 24 per process
  config = _subset_config(tiny_config, classes)
  shards = []
  for index in range(2):
    iterator = input_pipeline.create_train_iterator(
        config, global_batch_size=16, process_index=index, process_count=2)
    batches = [next(iterator) for _ in range(3)]  # one epoch of the shard
    state = iterator.get_state()
    want = [next(iterator) for _ in range(4)]
    iterator.close()
    resumed = input_pipeline.create_train_iterator(
        config, global_batch_size=16, process_index=index, process_count=2)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    resumed.close()
    for a, b in zip(want, got):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    for batch in batches:
      _check_labels_match_images(batch, classes)
    shards.append({b['image'][i].tobytes() for b in batches for i in range(8)})
  assert len(shards[0]) == len(shards[1]) == 24
  assert not shards[0] & shards[1]


@pytest.mark.parametrize('process_count,global_batch', [(1, 8), (2, 4),
                                                        (3, 6)])
def test_eval_covers_every_subset_example_once(tiny_config, process_count,
                                               global_batch):
  classes = ('Ankle boot', 'Pullover')
  config = _subset_config(tiny_config, classes)
  labels = _all_labels(config, 'test')
  want = np.flatnonzero(np.isin(labels, (9, 2)))
  assert len(want) == 8
  expected = input_pipeline.num_eval_batches(
      config, global_batch_size=global_batch, process_count=process_count)
  assert expected == -(-8 // global_batch)
  seen = []
  for index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        config, scale=SIDE, mode='center_crop', global_batch_size=global_batch,
        process_index=index, process_count=process_count))
    assert len(batches) == expected
    for batch in batches:
      mask = batch['mask']
      _check_labels_match_images(batch, classes, mask)
      # 'index' is the record's index in the whole split.
      remapped = np.where(labels[batch['index'][mask]] == 9, 0, 1)
      np.testing.assert_array_equal(batch['label'][mask], remapped)
      assert (batch['index'][~mask] == -1).all()
      seen += batch['index'][mask].tolist()
  assert sorted(seen) == want.tolist()


@pytest.mark.parametrize('classes,message', [
    (('Bag', 'Cat'), r"no class 'Cat'.*'T-shirt/top', 'Trouser'.*'Ankle boot'"),
    ((3, 10), r'Class index 10 not in \[0, 10\)'),
    ((-1,), r'Class index -1 not in'),
    (('Bag', 'Coat', 'Bag'), r"class 8 \('Bag'\) twice"),
    (('Coat', 4), r"class 4 \('Coat'\) twice"),
    ((True,), r'no class True'),
])
def test_bad_subsets_are_clear_errors(tiny_config, classes, message):
  config = _subset_config(tiny_config, classes)
  with pytest.raises(ValueError, match=message):
    input_pipeline.get_dataset_info(config)
  with pytest.raises(ValueError, match=message):
    input_pipeline.create_eval_iterator(config, scale=SIDE, mode='full')


def test_a_bare_string_is_refused(tiny_config):
  # The base config types the field as a tuple, so it refuses a bare string;
  # the selection refuses one from a config built without the field.
  with pytest.raises(TypeError, match='classes'):
    tiny_config.data.classes = 'Bag'
  info = input_pipeline.get_dataset_info(tiny_config)
  with pytest.raises(ValueError, match=r"not the string 'Bag'; write \('Bag',\)"):
    subsets.select_classes(info, 'Bag')


def test_training_on_a_subset_records_its_class_names(tiny_config, tmp_path):
  config = _subset_config(tiny_config, ('Coat', 'Sandal', 'Bag', 'Trouser'))
  config.model.num_classes = 4
  config.input.eval_scales = (SIDE,)
  config.train.max_steps = 1
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  _, meta = checkpointing.read_meta(str(workdir))
  assert meta['class_names'] == ['Coat', 'Sandal', 'Bag', 'Trouser']
  saved = checkpointing.read_config(str(workdir))
  assert list(saved.data.classes) == ['Coat', 'Sandal', 'Bag', 'Trouser']
  config.model.num_classes = 10
  with pytest.raises(ValueError, match='model.num_classes=10 but .* has 4 '
                     'classes'):
    train.train_and_evaluate(config, str(tmp_path / 'other'))
