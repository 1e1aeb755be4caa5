"""The paper's feature protocol: pooled, mirrored, multi-scale, normalised."""

from flax import nnx
import numpy as np
import pytest

from conftest import learnable_images
from vgg_jax import cli
from vgg_jax import datasets
from vgg_jax import extract
from vgg_jax import layers
from vgg_jax import linear_probe
from vgg_jax import preprocessing
from vgg_jax import weights
from vgg_jax.datasets import testing

BATCH = 8  # the tiny test split has 40 images: 5 batches


@pytest.fixture(scope='module')
def loaded(net_a_run):
  """``(model, config, metadata)`` of the shared tiny net A."""
  return weights.load_model(str(net_a_run))


@pytest.fixture(scope='module')
def test_feats(net_a_run, tmp_path_factory):
  """relu7 features of the tiny test split, written by the command line."""
  path = tmp_path_factory.mktemp('feats') / 'test.npz'
  code = cli.call(extract.define_flags, extract.main, [
      f'--workdir={net_a_run}', '--split=test', f'--output={path}',
      f'--batch_size={BATCH}'])
  assert code == 0
  return linear_probe.load_features(str(path))


def _extract(loaded, tmp_path, name, **kwargs):
  model, config, meta = loaded
  kwargs.setdefault('batch_size', BATCH)
  result = extract.extract_features(
      model, config, str(tmp_path / name), split='test',
      normalization=meta['normalization'], mean_rgb=meta.get('mean_rgb'),
      **kwargs)
  return result, linear_probe.load_features(result.path)


def _split_labels(config, split):
  """The labels of a split in record order, read from the dataset."""
  builder = datasets.get_builder(config.data.dataset,
                                 data_dir=config.data.data_dir,
                                 manual_dir=config.data.manual_dir)
  info = datasets.dataset_info(builder)
  source = datasets.data_source(builder, split, info)
  return np.array([source[i][info.label_key] for i in range(len(source))])


def test_cli_writes_unit_norm_relu7_features_with_the_split_labels(
    test_feats, loaded):
  model, config, _ = loaded
  width = model.fc7.out_features
  assert test_feats['features'].shape == (40, width)
  assert test_feats['features'].dtype == np.float32
  np.testing.assert_allclose(
      np.linalg.norm(test_feats['features'], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(test_feats['index'], np.arange(40))
  labels = _split_labels(config, 'test')
  np.testing.assert_array_equal(test_feats['labels'], labels)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                np.bincount(learnable_images(40, 1)[1]))
  assert len(test_feats['class_names']) == 10
  assert test_feats['layer'] == 'relu7'
  # Different images, different descriptors.
  assert np.ptp(test_feats['features'], axis=0).max() > 1e-4


def test_streams_in_batches_and_drops_padding(loaded, tmp_path, monkeypatch):
  chunks = []
  append = extract._RowWriter.append

  def spy(self, features, labels, index):
    chunks.append(len(features))
    append(self, features, labels, index)

  monkeypatch.setattr(extract._RowWriter, 'append', spy)
  # 40 images in batches of 16: the last batch holds 8 padding rows.
  result, feats = _extract(loaded, tmp_path, 'f.npz', batch_size=16,
                           layer='pool5')
  assert chunks == [16, 16, 8]
  assert result.num_batches == 3 and result.num_examples == 40
  assert feats['features'].shape == (40, loaded[0].fc6.in_features)
  np.testing.assert_array_equal(feats['index'], np.arange(40))


def _canvas(height, width, side, seed=0):
  rng = np.random.RandomState(seed)
  image = rng.randint(0, 256, (height, width, 3)).astype(np.uint8)
  canvas = np.zeros((1, side, side, 3), np.uint8)
  canvas[0, :height, :width] = image
  return canvas, np.array([[height, width]], np.int32), image


def model_split(model):
  """``(graphdef, rng_state, weights)`` of the model."""
  return nnx.split(model, nnx.RngState, ...)


def _normalizer(loaded):
  meta = loaded[2]
  return preprocessing.normalizer(meta['normalization'], meta.get('mean_rgb'))


@pytest.mark.parametrize('layer,stride', [('relu7', None), ('relu3_1', 4)])
def test_pooled_value_is_the_masked_mean(loaded, layer, stride):
  model = loaded[0]
  canvas, valid, image = _canvas(70, 90, 128)
  x = _normalizer(loaded)(canvas)
  act = np.asarray(model.features(x, [layer], valid_size=valid)[layer])[0]
  if stride is None:  # head: FC-6 (1x1 here) inside the image: 2 x 2
    rows, cols = 70 // 32, 90 // 32
  else:
    rows, cols = 70 // stride, 90 // stride
  mask = np.zeros(act.shape[:2], bool)
  mask[:rows, :cols] = True
  by_hand = act[mask].mean(axis=0)
  pooled = np.asarray(extract.pooled_features(model, x, valid, layer))[0]
  np.testing.assert_allclose(pooled, by_hand, rtol=1e-5, atol=1e-6)
  # The same as the image run on its own, without a canvas.
  alone = model.features(_normalizer(loaded)(image[None]), [layer])[layer]
  np.testing.assert_allclose(
      pooled, np.asarray(alone)[0, :rows, :cols].mean(axis=(0, 1)),
      rtol=1e-4, atol=1e-5)


def test_mirror_average_equals_the_two_passes_by_hand(loaded):
  model = loaded[0]
  canvas, valid, image = _canvas(64, 96, 128, seed=1)
  mirror = canvas.copy()
  mirror[0, :64, :96] = image[:, ::-1]
  normalize = _normalizer(loaded)
  passes = [np.asarray(extract.pooled_features(model, normalize(c), valid,
                                               'relu7'))
            for c in (canvas, mirror)]
  graphdef, rng_state, params = model_split(model)
  got = extract.FeatureFn(graphdef, rng_state, normalize, 'relu7')(
      params, canvas, valid)
  np.testing.assert_allclose(np.asarray(got), 0.5 * (passes[0] + passes[1]),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(passes[0], passes[1])  # the mirror changes them


def test_multi_scale_is_the_mean_of_single_scales_before_normalising(
    loaded, tmp_path):
  single = [_extract(loaded, tmp_path, f'q{q}.npz', scales=[q],
                     normalize=False)[1]['features'] for q in (32, 64)]
  raw = _extract(loaded, tmp_path, 'raw.npz', scales=[32, 64],
                 normalize=False)[1]['features']
  np.testing.assert_allclose(raw, 0.5 * (single[0] + single[1]), rtol=1e-5,
                             atol=1e-7)
  result, feats = _extract(loaded, tmp_path, 'both.npz', scales=[32, 64])
  assert result.scales == (32, 64) and feats['scales'] == (32, 64)
  np.testing.assert_allclose(feats['features'], extract.l2_normalize(raw),
                             rtol=1e-5, atol=1e-7)
  assert not np.allclose(single[0], single[1])


def test_another_dataset_through_config_overrides(net_a_run, tmp_path):
  pixels = {f'{c}{i}': testing.ramp_image(40 + 8 * i, 36) for c in 'ab'
            for i in range(3)}
  files = {f'train/{name[0]}/{name}.png': testing.encode(p)
           for name, p in pixels.items()}
  files['train/b/broken.png'] = b'not an image'
  root = testing.write_image_folder(tmp_path / 'imgs', files)
  out = tmp_path / 'folder.npz'
  code = cli.call(extract.define_flags, extract.main, [
      f'--workdir={net_a_run}', '--split=train', f'--output={out}',
      '--batch_size=4', '--layer=fc7', '--config.data.dataset=image_folder',
      f'--config.data.manual_dir={root}',
      f'--config.data.data_dir={tmp_path / "tfds"}'])
  assert code == 0
  feats = linear_probe.load_features(str(out))
  assert feats['class_names'] == ['a', 'b']
  assert feats['features'].shape[0] == 6  # the unreadable image is left out
  assert sorted(feats['labels'].tolist()) == [0, 0, 0, 1, 1, 1]
  assert np.all(np.diff(feats['index']) > 0)
  assert feats['layer'] == 'fc7'


def test_features_feed_the_linear_probe(net_a_run, test_feats, tmp_path):
  out = tmp_path / 'train.npz'
  assert cli.call(extract.define_flags, extract.main, [
      f'--workdir={net_a_run}', '--split=train', f'--output={out}',
      '--batch_size=32']) == 0
  train = linear_probe.load_features(str(out))
  probe = linear_probe.train_linear_probe(train['features'], train['labels'],
                                          num_classes=10, steps=100)
  result = linear_probe.evaluate_linear_probe(
      probe, test_feats['features'], test_feats['labels'])
  assert result['num_examples'] == 40
  assert 0.0 <= result['top1'] <= result['top5'] <= 1.0


@pytest.mark.parametrize('args,message', [
    (['--layer=fc9'], 'valid layers of vgg11: conv1_1'),
    (['--scales=16'], 'smaller than'),
    (['--batch_size=0'], 'positive multiple'),
])
def test_bad_requests_exit_1_with_one_line(net_a_run, tmp_path, capsys, args,
                                          message):
  out = tmp_path / 'x.npz'
  code = cli.call(extract.define_flags, extract.main, [
      f'--workdir={net_a_run}', f'--output={out}', *args])
  err = capsys.readouterr().err.strip()
  assert code == 1
  assert len(err.splitlines()) == 1 and message in err, err
  assert not out.exists()


def test_existing_output_or_missing_workdir_exit_1(net_a_run, tmp_path,
                                                   capsys):
  out = tmp_path / 'x.npz'
  out.write_bytes(b'keep')
  code = cli.call(extract.define_flags, extract.main, [
      f'--workdir={net_a_run}', f'--output={out}'])
  assert code == 1 and 'exists' in capsys.readouterr().err
  assert out.read_bytes() == b'keep'
  code = cli.call(extract.define_flags, extract.main, [
      f'--workdir={tmp_path / "nowhere"}', f'--output={tmp_path / "y.npz"}'])
  err = capsys.readouterr().err.strip()
  assert code == 1 and len(err.splitlines()) == 1


def test_layer_mask_matches_the_masks_features_applies(loaded):
  model = loaded[0]
  canvas, valid, _ = _canvas(70, 90, 128)
  x = _normalizer(loaded)(canvas)
  # Pre-ReLU layers are non-zero wherever features() keeps them.
  for layer in ('conv2_1', 'conv4_2', 'fc6', 'fc8'):
    assert layer in layers.layer_names(model.name)
    act = np.asarray(model.features(x, [layer], valid_size=valid)[layer])[0]
    mask = np.asarray(model.layer_mask(layer, valid, act.shape[:2]))[0]
    assert not np.any(act[~mask]), layer
    assert np.all(np.abs(act[mask]).max(axis=-1) > 0), layer
    assert 0 < mask.sum() < mask.size, layer
