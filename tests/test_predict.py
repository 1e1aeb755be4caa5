"""Tests of `python -m vgg_jax.predict` on images the tests write."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_evaluate import _save_run
from test_protocols import tiny_model
from vgg_jax import cli
from vgg_jax import eval_plan
from vgg_jax import predict
from vgg_jax import preprocessing
from vgg_jax.configs import base

NAMES = ['ant', 'bee', 'cat', 'dog', 'eel']


@pytest.fixture(scope='module')
def member():
  config = base.get_config()
  config.input.update(crop_size=32, scale_min=32, scale_max=48,
                      normalization='imagenet_mean_std')
  return eval_plan.Member(tiny_model(), config,
                         metadata={'class_names': NAMES})


@pytest.fixture(scope='module')
def saved_run(member, tmp_path_factory):
  """A workdir of a 10-class tiny net with numbered class names."""
  config = member.config.copy_and_resolve_references()
  config.model.update(name='vgg11', num_classes=10, width_multiplier=1 / 16,
                      fc6_kernel=1, init='he')
  return _save_run(tmp_path_factory.mktemp('predict') / 'run',
                   tiny_model(num_classes=10), config)


@pytest.fixture
def image_files(tmp_path):
  rng = np.random.default_rng(0)
  paths = {'rgb': tmp_path / 'rgb.png', 'grey': tmp_path / 'grey.jpg',
           'corrupt': tmp_path / 'corrupt.jpg', 'empty': tmp_path / 'empty.png',
           'missing': tmp_path / 'missing.png'}
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8)).save(
      paths['rgb'])
  Image.fromarray(rng.integers(0, 256, (90, 40), np.uint8)).save(
      paths['grey'])
  with open(paths['rgb'], 'rb') as f:
    paths['corrupt'].write_bytes(f.read()[:40])  # a truncated PNG
  paths['empty'].write_bytes(b'')
  return {k: str(v) for k, v in paths.items()}


def test_bad_images_are_reported_and_the_rest_predicted(member, image_files):
  order = ['rgb', 'corrupt', 'grey', 'empty', 'missing']
  results = predict.predict_files(member, [image_files[k] for k in order])
  assert [r['path'] for r in results] == [image_files[k] for k in order]
  for key, r in zip(order, results):
    if key in ('rgb', 'grey'):
      preds = r['predictions']
      assert [p['rank'] for p in preds] == [1, 2, 3, 4, 5]
      assert [p['class_name'] for p in preds] == [
          NAMES[p['class_index']] for p in preds]
      probs = [p['probability'] for p in preds]
      assert probs == sorted(probs, reverse=True)
      assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # all 5 classes
    else:
      assert 'predictions' not in r
      assert image_files[key] in r['error']  # the message names the file
  assert 'No such file' in results[-1]['error']
  assert 'empty' in results[3]['error']


def test_dense_prediction_is_the_papers_recipe(member):
  # Smallest side already Q: no resampling, so the hand computation below
  # sees exactly the pixels predict sees.
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (40, 56, 3), np.uint8)
  got = predict.Predictor(member, protocol='dense', scales=(40,))(image)
  x = preprocessing.normalize(jnp.asarray(image[None]), 'imagenet_mean_std')
  score_map = jax.jit(lambda x: member.model.score_map(x))
  post = [jax.nn.softmax(score_map(v).mean(axis=(1, 2)))[0]
          for v in (x, x[:, :, ::-1])]
  np.testing.assert_allclose(got, 0.5 * (post[0] + post[1]), rtol=1e-4,
                             atol=1e-6)
  crop = predict.Predictor(member, protocol='center_crop', scales=(40,))
  assert np.abs(crop(image) - got).max() > 1e-4  # a different protocol
  with pytest.raises(ValueError, match='smaller than the crop'):
    predict.Predictor(member, scales=(16,))
  with pytest.raises(ValueError, match='Unknown protocol'):
    predict.Predictor(member, protocol='multi_crop')


def test_cli_prints_top5_json_and_fails_on_any_bad_image(
    saved_run, image_files, capsys):
  run = saved_run
  rc = cli.call(predict.define_flags, predict.main,
                [f'--workdir={run}', '--json', image_files['rgb'],
                 image_files['corrupt']], positional=True)
  captured = capsys.readouterr()
  assert rc == 1
  results = json.loads(captured.out)
  assert results[0]['path'] == image_files['rgb']
  assert len(results[0]['predictions']) == 5
  assert results[0]['predictions'][0]['class_name'].startswith('class_')
  assert 'error' in results[1]
  assert '1 of 2 image(s) failed' in captured.err
  rc = cli.call(predict.define_flags, predict.main,
                [f'--workdir={run}', '--protocol=center_crop',
                 image_files['grey']], positional=True)
  captured = capsys.readouterr()
  assert rc == 0
  assert captured.out.splitlines()[0] == image_files['grey']
  assert captured.out.splitlines()[1].lstrip().startswith('1.')


def test_class_names_fall_back_to_numbers_without_metadata(member, tmp_path):
  bare = eval_plan.Member(member.model,
                         member.config.copy_and_resolve_references())
  bare.config.data.dataset = 'image_folder'
  bare.config.data.manual_dir = str(tmp_path / 'absent')
  assert predict.class_names(bare) == [f'class {i}' for i in range(5)]
  assert predict.class_names(member) == NAMES


@pytest.mark.parametrize('args, named', [
    (['--protocol=multi_crop'], 'multi_crop'),
    (['--scales=16'], '16'),
    (['--config.data.dir=x'], '--config.data.dir'),
    (['--top_k=five'], 'five'),
    ([], 'No image files'),
])
def test_cli_rejects_bad_arguments_in_one_line(saved_run, image_files, capsys,
                                               args, named):
  images = [image_files['rgb']] if args else []
  rc = cli.call(predict.define_flags, predict.main,
                [f'--workdir={saved_run}', *args, *images], positional=True)
  err = capsys.readouterr().err
  assert rc == 1
  errors = [line for line in err.splitlines() if ': error: ' in line]
  assert len(errors) == 1 and named in errors[0], err
  assert 'Traceback' not in err
