"""The package's TFDS builders: Fashion-MNIST from IDX files, image folders."""

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vgg_jax import datasets
from vgg_jax import decoding
from vgg_jax import input_pipeline
from vgg_jax.configs import base
from vgg_jax.datasets import fashion_mnist
from vgg_jax.datasets import image_folder
from vgg_jax.datasets import testing


def _idx_splits(seed=0):
  rng = np.random.default_rng(seed)
  return {'train': (rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, 50, dtype=np.uint8)),
          'test': (rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, 20, dtype=np.uint8))}


def _config(tmp_path, dataset, manual_dir):
  config = base.get_config()
  config.data.dataset = dataset
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(manual_dir) if manual_dir else None
  return config


def test_fashion_mnist_prepares_from_idx_files(tmp_path):
  splits = _idx_splits()
  idx_dir = testing.write_idx_files(tmp_path / 'idx', splits)
  config = _config(tmp_path, 'fashion_mnist', idx_dir)
  info = input_pipeline.get_dataset_info(config)
  assert info.num_examples == {'train': 50, 'test': 20}
  assert info.num_classes == 10
  assert info.class_names == fashion_mnist.CLASS_NAMES
  assert info.class_names[0] == 'T-shirt/top'
  assert info.class_names[9] == 'Ankle boot'
  builder = datasets.get_builder('fashion_mnist', data_dir=config.data.data_dir)
  assert builder.is_prepared()
  for split, (images, labels) in splits.items():
    source = datasets.data_source(builder, split, info)
    assert len(source) == len(labels)
    got = {}
    for i in range(len(source)):
      record = source[i]
      pixels = np.asarray(decoding.decode(record['image']))
      got[pixels[..., 0].tobytes()] = int(record['label'])
      # Grey becomes three equal channels.
      assert (pixels[..., 0] == pixels[..., 2]).all()
    # TFDS shuffles records when writing; every image keeps its label.
    want = {image.tobytes(): int(label) for image, label in zip(images, labels)}
    assert got == want


def test_fashion_mnist_reads_plain_idx_files_from_the_environment(
    tmp_path, monkeypatch):
  idx_dir = testing.write_idx_files(tmp_path / 'plain', _idx_splits(1),
                                    compress=False)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, idx_dir)
  files = fashion_mnist.find_idx_files(None)
  assert files['test'][0] == os.path.join(idx_dir, 't10k-images-idx3-ubyte')
  info = input_pipeline.get_dataset_info(_config(tmp_path, 'fashion_mnist',
                                                 None))
  assert info.num_examples['train'] == 50


def test_fashion_mnist_missing_files_error_says_how_to_get_them(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  config = _config(tmp_path, 'fashion_mnist', empty)
  with pytest.raises(fashion_mnist.MissingDataError) as error:
    input_pipeline.get_dataset_info(config)
  message = str(error.value)
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '--config.data.manual_dir' in message
  assert fashion_mnist.ENV_VAR in message
  assert str(empty) in message
  assert 'train-images-idx3-ubyte' in message


def test_imagenet_without_its_archives_is_one_clear_error(tmp_path):
  (tmp_path / 'manual').mkdir()
  builder = datasets.get_builder('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                                 manual_dir=str(tmp_path / 'manual'))
  with pytest.raises(FileNotFoundError,
                     match='imagenet2012 needs files downloaded by hand: .*'
                           'ILSVRC2012_img_train.tar.*manual_dir'):
    datasets.ensure_prepared(builder, str(tmp_path / 'manual'))


def test_fashion_mnist_rejects_a_wrong_idx_file(tmp_path):
  idx_dir = testing.write_idx_files(tmp_path / 'idx', _idx_splits(),
                                    compress=False)
  # Swap images and labels of the test split.
  images = os.path.join(idx_dir, 't10k-images-idx3-ubyte')
  labels = os.path.join(idx_dir, 't10k-labels-idx1-ubyte')
  os.rename(images, images + '.tmp')
  os.rename(labels, images)
  os.rename(images + '.tmp', labels)
  with pytest.raises(ValueError, match='magic number 2049, expected 2051'):
    fashion_mnist.read_split(*fashion_mnist.find_idx_files(idx_dir)['test'])


def _folder_files():
  rng = np.random.default_rng(0)
  pixels = lambda: rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  return {
      'train/zebra/a.jpg': testing.encode(pixels(), 'JPEG', quality=90),
      'train/zebra/nested/b.png': testing.encode(pixels()),
      'train/ant/c.PNG': testing.encode(pixels()),
      'train/ant/README.txt': b'ignored: not an image extension',
      'train/ant/.hidden.jpg': b'ignored: hidden',
      'validation/ant/d.gif': testing.encode(pixels(), 'GIF'),
      'validation/cat/e.bmp': testing.encode(pixels(), 'BMP'),
  }


def test_image_folder_builder_keeps_original_bytes(tmp_path):
  files = _folder_files()
  root = testing.write_image_folder(tmp_path / 'my images', files)
  config = _config(tmp_path, 'image_folder', root)
  info = input_pipeline.get_dataset_info(config)
  # Classes: sorted union of every split's folders.
  assert info.class_names == ('ant', 'cat', 'zebra')
  assert info.num_examples == {'train': 3, 'validation': 2}
  assert info.id_key == 'file_name'
  builder = datasets.get_builder('image_folder', data_dir=config.data.data_dir,
                                 manual_dir=root)
  assert builder.info.config_name == image_folder.config_name(root)
  assert builder.info.config_name.startswith('my_images-')
  seen = {}
  for split in ('train', 'validation'):
    source = datasets.data_source(builder, split, info)
    for i in range(len(source)):
      record = source[i]
      name = record['file_name'].decode()
      seen[name] = (record['image'], info.class_names[record['label']])
  assert set(seen) == {'train/zebra/a.jpg', 'train/zebra/nested/b.png',
                       'train/ant/c.PNG', 'validation/ant/d.gif',
                       'validation/cat/e.bmp'}
  for name, (data, label) in seen.items():
    assert data == files[name]  # not re-encoded
    assert label == name.split('/')[1]


def test_image_folder_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    image_folder.scan_layout(str(tmp_path / 'nope'))
  (tmp_path / 'flat').mkdir()
  with pytest.raises(ValueError, match='no split directories'):
    image_folder.scan_layout(str(tmp_path / 'flat'))
  (tmp_path / 'noclass' / 'train').mkdir(parents=True)
  with pytest.raises(ValueError, match='No class directories'):
    image_folder.scan_layout(str(tmp_path / 'noclass'))
  with pytest.raises(ValueError, match='manual_dir'):
    datasets.get_builder('image_folder', data_dir=str(tmp_path))


def test_unknown_dataset_and_split_errors(tmp_path):
  with pytest.raises(ValueError, match='Unknown dataset'):
    datasets.get_builder('no_such_dataset_xyz', data_dir=str(tmp_path))
  root = testing.write_image_folder(tmp_path / 'imgs', {
      'train/a/1.png': testing.encode(np.zeros((4, 4, 3), np.uint8))})
  config = _config(tmp_path, 'image_folder', root)
  with pytest.raises(ValueError, match="no split 'validation'.*'train'"):
    input_pipeline.num_eval_batches(config, global_batch_size=2)


def test_image_folder_needs_no_tensorflow(tmp_path):
  root = testing.write_image_folder(tmp_path / 'imgs', _folder_files())
  script = textwrap.dedent(f"""
      import sys
      from vgg_jax.configs import base
      from vgg_jax import input_pipeline
      config = base.get_config()
      config.data.dataset = 'image_folder'
      config.data.manual_dir = {root!r}
      config.data.data_dir = {str(tmp_path / 'tfds')!r}
      config.data.num_workers = 0
      config.input.scale_min = config.input.scale_max = 32
      config.input.crop_size = 32
      it = input_pipeline.create_train_iterator(config, global_batch_size=2)
      assert next(it)['image'].shape == (2, 32, 32, 3)
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
      """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True,
                          text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-2000:]


def test_a_builder_made_before_another_prepared_it_reads_the_data(tmp_path):
  idx_dir = testing.write_idx_files(tmp_path / 'idx', _idx_splits())
  make = functools.partial(datasets.get_builder, 'fashion_mnist',
                           data_dir=str(tmp_path / 'tfds'), manual_dir=idx_dir)
  early, preparer = make(), make()
  datasets.ensure_prepared(preparer)
  datasets.ensure_prepared(early)  # as a process that waited on the lock
  info = datasets.dataset_info(early)
  assert info.num_examples == {'train': 50, 'test': 20}
  assert len(datasets.data_source(early, 'test', info)) == 20


def test_an_incomplete_dataset_directory_is_a_clear_error(tmp_path):
  idx_dir = testing.write_idx_files(tmp_path / 'idx', _idx_splits())
  builder = datasets.get_builder('fashion_mnist',
                                 data_dir=str(tmp_path / 'tfds'),
                                 manual_dir=idx_dir)
  builder.data_path.mkdir(parents=True)  # e.g. a half-finished copy
  (builder.data_path / 'fashion_mnist_idx-train.array_record-00000-of-00001'
  ).write_bytes(b'')
  with pytest.raises(datasets.DamagedDatasetError,
                     match='holds no complete prepared dataset.*delete it'):
    datasets.ensure_prepared(builder)


def _fail_reading(*args, **kwargs):
  raise AssertionError('labels were read from the records again')


def _read_only(*args, **kwargs):
  raise PermissionError('read-only file system')


def test_labels_are_read_once_and_cached_beside_the_dataset(
    tmp_path, monkeypatch):
  idx_dir = testing.write_idx_files(tmp_path / 'idx', _idx_splits())
  config = _config(tmp_path, 'fashion_mnist', idx_dir)
  info = input_pipeline.get_dataset_info(config)
  builder = datasets.get_builder('fashion_mnist', data_dir=config.data.data_dir)
  source = datasets.data_source(builder, 'train', info)
  want = [int(source[i]['label']) for i in range(len(source))]
  labels = source.labels('label')
  assert labels.dtype == np.int32 and labels.tolist() == want
  assert sorted(want) != want  # TFDS shuffled them: the order is checked
  part = datasets.data_source(builder, 'train[10:20]', info)
  assert part.labels('label').tolist() == want[10:20]
  cache = builder.data_path / datasets.LABELS_DIR
  cached = cache / ('fashion_mnist_idx-train.array_record-00000-of-00001'
                    '.label.npy')
  assert np.load(cached).tolist() == want
  # A new process (empty memory cache) loads them without reading records.
  monkeypatch.setattr(datasets, '_labels', {})
  monkeypatch.setattr(datasets, '_read_labels', _fail_reading)
  assert source.labels('label').tolist() == want
  monkeypatch.undo()
  # A damaged cache is read again and replaced.
  monkeypatch.setattr(datasets, '_labels', {})
  cached.write_bytes(b'\x93NUMPY damaged')
  assert source.labels('label').tolist() == want
  assert np.load(cached).tolist() == want


def test_labels_of_a_read_only_dataset_stay_in_memory(tmp_path, monkeypatch):
  idx_dir = testing.write_idx_files(tmp_path / 'idx', _idx_splits(2))
  config = _config(tmp_path, 'fashion_mnist', idx_dir)
  info = input_pipeline.get_dataset_info(config)
  builder = datasets.get_builder('fashion_mnist', data_dir=config.data.data_dir)
  source = datasets.data_source(builder, 'test', info)
  monkeypatch.setattr(datasets.paths, 'replaced_atomically', _read_only)
  want = [int(source[i]['label']) for i in range(len(source))]
  assert source.labels('label').tolist() == want
  assert not (builder.data_path / datasets.LABELS_DIR).exists()
  monkeypatch.setattr(datasets, '_read_labels', _fail_reading)
  assert source.labels('label').tolist() == want  # from memory
