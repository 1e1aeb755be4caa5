"""vgg_jax.convert: torchvision / timm / Keras weights in, torchvision out.

No published file is downloaded: the torchvision and timm state dicts are
built here with their exact key names and shapes, and the Keras files are
written by Keras itself from randomly initialised keras.applications models.
"""

import json
import os
import pathlib
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from vgg_jax import cli
from vgg_jax import convert
from vgg_jax import layouts
from vgg_jax import models
from vgg_jax import preprocessing
from vgg_jax import pretrained
from vgg_jax import trees
from vgg_jax import weight_files

REPO = pathlib.Path(__file__).resolve().parents[1]
# 1/16 width keeps FC-6 a 7x7 conv over a 224 image (the flatten order
# matters) while the NumPy reference stays fast: channels 4..32, FC 256.
SMALL = dict(width_multiplier=1 / 16, num_classes=10)

# torchvision/models/vgg.py's cfgs, written out again so the layout under
# test is not derived from vgg_jax.models.
TV_CFGS = {
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512,
              512, 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512,
              'M', 512, 512, 512, 'M'],
    'vgg19': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512,
              512, 512, 'M', 512, 512, 512, 512, 'M'],
}


def torch_shapes(name, *, layout='torchvision', num_classes=1000,
                 width_multiplier=1.0):
  """State-dict names and shapes as torchvision's / timm's VGG have them."""
  batch_norm = name.endswith('_bn')
  scale = lambda c: max(1, int(round(c * width_multiplier)))
  out, idx, c = {}, 0, 3
  for v in TV_CFGS[name.removesuffix('_bn')]:
    if v == 'M':
      idx += 1
      continue
    v = scale(v)
    out[f'features.{idx}.weight'] = (v, c, 3, 3)
    out[f'features.{idx}.bias'] = (v,)
    if batch_norm:
      for suffix in ('weight', 'bias', 'running_mean', 'running_var'):
        out[f'features.{idx + 1}.{suffix}'] = (v,)
      out[f'features.{idx + 1}.num_batches_tracked'] = ()
    idx += 3 if batch_norm else 2
    c = v
  fc = scale(4096)
  if layout == 'torchvision':  # Linear(512*7*7, 4096), Linear, Linear
    out.update({'classifier.0.weight': (fc, c * 49), 'classifier.0.bias': (fc,),
                'classifier.3.weight': (fc, fc), 'classifier.3.bias': (fc,),
                'classifier.6.weight': (num_classes, fc),
                'classifier.6.bias': (num_classes,)})
  else:  # timm: ConvMlp(fc1 7x7 conv, fc2 1x1 conv), ClassifierHead(fc)
    out.update({'pre_logits.fc1.weight': (fc, c, 7, 7),
                'pre_logits.fc1.bias': (fc,),
                'pre_logits.fc2.weight': (fc, fc, 1, 1),
                'pre_logits.fc2.bias': (fc,),
                'head.fc.weight': (num_classes, fc),
                'head.fc.bias': (num_classes,)})
  return out


def random_state_dict(shapes, seed):
  """Random tensors of these shapes, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in shapes.items():
    if k.endswith('num_batches_tracked'):
      out[k] = np.array(1234, np.int64)
    elif k.endswith('running_var'):
      out[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif len(shape) == 1 and k.endswith('.weight'):  # BN scale
      out[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif len(shape) == 1:
      out[k] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      fan_in = int(np.prod(shape[1:]))
      out[k] = (rng.standard_normal(shape, np.float32) *
                np.float32(np.sqrt(2.0 / fan_in)))
  return out


# ------------------------------------------------ NumPy reference (NCHW) ---


def np_conv(x, w, b, pad):
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
  return np.einsum('nchwij,ocij->nohw', win, w, optimize=True) + b[:, None,
                                                                     None]


def np_maxpool(x):
  n, c, h, w = x.shape
  return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def np_features(sd, name, x):
  """torchvision's ``model.features`` in float64 NumPy, eval mode."""
  relu = lambda a: np.maximum(a, 0)
  idx = 0
  for v in TV_CFGS[name.removesuffix('_bn')]:
    if v == 'M':
      x, idx = np_maxpool(x), idx + 1
      continue
    p = lambda s, i=idx: sd[f'features.{i}.{s}'].astype(np.float64)
    x = np_conv(x, p('weight'), p('bias'), 1)
    if name.endswith('_bn'):
      q = lambda s, i=idx + 1: sd[f'features.{i}.{s}'].astype(np.float64)
      x = ((x - q('running_mean')[:, None, None]) /
           np.sqrt(q('running_var') + 1e-5)[:, None, None] *
           q('weight')[:, None, None] + q('bias')[:, None, None])
      idx += 3
    else:
      idx += 2
    x = relu(x)
  return x


def np_torchvision_logits(sd, name, x):
  relu = lambda a: np.maximum(a, 0)
  g = lambda k: sd[k].astype(np.float64)
  x = np_features(sd, name, x)  # 7x7: torchvision's AdaptiveAvgPool is a no-op
  x = x.reshape(x.shape[0], -1)  # torch.flatten: C, H, W order
  x = relu(x @ g('classifier.0.weight').T + g('classifier.0.bias'))
  x = relu(x @ g('classifier.3.weight').T + g('classifier.3.bias'))
  return x @ g('classifier.6.weight').T + g('classifier.6.bias')


def np_timm_logits(sd, name, x):
  relu = lambda a: np.maximum(a, 0)
  g = lambda k: sd[k].astype(np.float64)
  x = np_features(sd, name, x)
  x = relu(np_conv(x, g('pre_logits.fc1.weight'), g('pre_logits.fc1.bias'), 0))
  x = relu(np_conv(x, g('pre_logits.fc2.weight'), g('pre_logits.fc2.bias'), 0))
  x = x.mean(axis=(2, 3))  # ClassifierHead: global average pool, then fc
  return x @ g('head.fc.weight').T + g('head.fc.bias')


def torch_normalize(images):
  """torchvision's ToTensor + Normalize, NCHW float64."""
  x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
  mean = np.array([0.485, 0.456, 0.406])[:, None, None]
  std = np.array([0.229, 0.224, 0.225])[:, None, None]
  return (x - mean) / std


def images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                              dtype=np.uint8)


def assert_close(got, want, rtol=1e-4):
  """fp32 vs float64: max abs difference within rtol of the largest value."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err <= rtol * scale, f'max abs diff {err} > {rtol} * {scale}'


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'vgg_jax.convert', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ tests ---


@pytest.mark.parametrize('name', layouts.SUPPORTED_MODELS['torchvision'])
def test_torch_layouts_match_torchvision_and_timm(name):
  assert layouts.expected_source_shapes('torchvision', name) == torch_shapes(
      name)
  assert layouts.expected_source_shapes('timm', name) == torch_shapes(
      name, layout='timm')
  assert layouts.expected_source_shapes('torchvision', name, **SMALL) == (
      torch_shapes(name, **SMALL))


def test_torchvision_landmarks():
  # Known points of the published files' layout.
  vgg16 = layouts.expected_source_shapes('torchvision', 'vgg16')
  assert vgg16['classifier.0.weight'] == (4096, 25088)
  assert vgg16['features.28.weight'] == (512, 512, 3, 3)
  assert 'features.30.weight' not in vgg16
  vgg16_bn = layouts.expected_source_shapes('torchvision', 'vgg16_bn')
  assert vgg16_bn['features.41.running_var'] == (512,)
  n = sum(int(np.prod(s)) for k, s in vgg16.items())
  assert n == 138_357_544  # docs/paper.md §1, Table 1 D


@pytest.mark.parametrize('name', ['vgg11', 'vgg16_bn'])
def test_torchvision_logits_match_numpy_reference(name, tmp_path):
  sd = random_state_dict(torch_shapes(name, **SMALL), seed=1)
  src = tmp_path / f'{name}.safetensors'
  save_file(sd, src)
  out = convert.convert_file('torchvision', src, tmp_path / 'pt', name,
                             width_multiplier=SMALL['width_multiplier'])
  model, meta = pretrained.load_pretrained(out)
  assert meta['normalization'] == 'imagenet_mean_std'
  assert meta['channel_order'] == 'RGB'
  assert meta['model']['num_classes'] == 10  # read from the file
  imgs = images(2, 224)
  x = preprocessing.normalize(imgs, meta['normalization'])
  assert_close(model(x), np_torchvision_logits(sd, name, torch_normalize(imgs)))


def test_timm_logits_match_numpy_reference(tmp_path):
  name = 'vgg13_bn'
  sd = random_state_dict(torch_shapes(name, layout='timm', **SMALL), seed=2)
  src = tmp_path / 'model.safetensors'
  save_file(sd, src)
  out = convert.convert_file('timm', src, tmp_path / 'pt', name,
                             width_multiplier=SMALL['width_multiplier'])
  model, meta = pretrained.load_pretrained(out)
  assert meta['source'] == 'timm' and meta['normalization'] == (
      'imagenet_mean_std')
  imgs = images(2, 224, seed=3)
  x = preprocessing.normalize(imgs, meta['normalization'])
  assert_close(model(x), np_timm_logits(sd, name, torch_normalize(imgs)))
  # timm -> vgg_jax -> timm is exact.
  back = convert.export_weights(out, tmp_path / 'back.safetensors', to='timm')
  back = load_file(back)
  assert set(back) == set(sd)
  for k, v in sd.items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_full_size_vgg11_fc6_relayout(tmp_path):
  # The real (4096, 25088) FC-6 and full widths, once (round trips are
  # checked at small width below).
  shapes = torch_shapes('vgg11')
  rng = np.random.default_rng(0)
  sd = {k: rng.random(s, np.float32) for k, s in shapes.items()}
  src = tmp_path / 'vgg11.safetensors'
  save_file(sd, src)
  out = convert.convert_file('torchvision', src, tmp_path / 'pt', 'vgg11')
  state, meta = pretrained.load_state_dict(out)
  assert meta['model']['num_classes'] == 1000
  assert meta['sha256'] == weight_files.file_sha256(src)
  assert meta['source_file'] == 'vgg11.safetensors'
  kernel, w = state['fc6']['kernel'], sd['classifier.0.weight']
  assert kernel.shape == (7, 7, 512, 4096)
  for h, x, c, o in rng.integers(0, [7, 7, 512, 4096], (200, 4)):
    # Linear input index of torch.flatten over (C, H, W) = c*49 + h*7 + x.
    assert kernel[h, x, c, o] == w[o, c * 49 + h * 7 + x]
  conv, wc = state['blocks'][3]['convs'][1]['kernel'], sd['features.13.weight']
  for i, j, c, o in rng.integers(0, [3, 3, 512, 512], (50, 4)):
    assert conv[i, j, c, o] == wc[o, c, i, j]
  np.testing.assert_array_equal(state['fc8']['kernel'][0, 0],
                                sd['classifier.6.weight'].T)
  np.testing.assert_array_equal(state['fc7']['bias'], sd['classifier.3.bias'])


def _random_vgg_jax(name, seed):
  """A vgg_jax weight dict with random values (positive BN variances)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for k, (shape, _) in pretrained.expected_shapes(name, **SMALL).items():
    value = rng.standard_normal(shape).astype(np.float32)
    flat[k] = np.abs(value) + 0.5 if k[-1] == 'var' else value
  return trees.unflatten(flat)


def test_vgg_jax_to_torchvision_to_vgg_jax_is_exact_via_cli(tmp_path, capsys):
  name = 'vgg13_bn'
  state = _random_vgg_jax(name, seed=4)
  names = [f'class {i}' for i in range(10)]
  meta = pretrained.make_metadata(name, normalization='mean_rgb',
                                  class_names=names, **SMALL)
  src = pretrained.save_pretrained(tmp_path / 'orig', state, meta)
  exported = tmp_path / 'tv.safetensors'
  # The program as users run it, once.
  done = run_cli('--to=torchvision', f'--input={src}', f'--output={exported}')
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == str(exported)
  assert {k: v.shape for k, v in load_file(exported).items()} == torch_shapes(
      name, **SMALL)
  assert cli.call(convert.define_flags, convert.main, [
      '--source=torchvision', '--model=' + name,
      f'--width_multiplier={SMALL["width_multiplier"]}',
      f'--input={exported}', f'--output={tmp_path / "again"}']) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / 'again')
  again, again_meta = pretrained.load_state_dict(tmp_path / 'again')
  flat, flat_again = trees.flatten(state), trees.flatten(again)
  assert set(flat) == set(flat_again)
  for k, v in flat.items():
    np.testing.assert_array_equal(flat_again[k], v, err_msg=str(k))
  # The header carried what the weights expect.
  assert again_meta['normalization'] == 'mean_rgb'
  assert again_meta['mean_rgb'] == list(preprocessing.IMAGENET_MEAN_RGB)
  assert again_meta['class_names'] == names
  assert again_meta['source'] == 'torchvision'


def test_cli_user_errors_are_one_line_and_help_works(tmp_path):
  missing = tmp_path / 'missing.safetensors'
  done = run_cli('--source=torchvision', '--model=vgg11', f'--input={missing}',
                 f'--output={tmp_path / "out"}')
  assert done.returncode == 1
  assert 'Traceback' not in done.stderr
  lines = done.stderr.strip().splitlines()
  assert lines[-1] == f'vgg_jax.convert: error: No such file: {missing}'
  assert not (tmp_path / 'out').exists()
  done = run_cli('--helpfull')  # absl exits 1 after printing the help
  assert 'vgg_jax/convert.py:' in done.stdout, done.stderr[-2000:]
  for flag in ('--source', '--to', '--model', '--[no]flip_to_rgb',
               '--[no]include_top'):
    assert flag in done.stdout
  assert 'Traceback' not in done.stderr


@pytest.mark.parametrize('args,message', [
    ([], 'Pass exactly one of --source (import) and --to (export).'),
    (['--source=keras', '--to=timm', '--input=a', '--output=b'],
     'Pass exactly one of --source'),
    (['--to=timm', '--input=a'], '--input and --output are required.'),
    (['--source=keras', '--input=a', '--output=b'],
     '--model is required with --source.'),
    (['--to=timm', '--model=vgg99'], "flag --model=vgg99"),
])
def test_cli_usage_errors(capsys, args, message):
  assert cli.call(convert.define_flags, convert.main, args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert ': error: ' in err[0] and message in err[0]


def test_cli_flag_defaults_are_the_model_defaults():
  fv = flags.FlagValues()
  convert.define_flags(fv)
  fv(['prog'])
  for name, value in models.ModelOptions().as_dict().items():
    if name != 'num_classes':  # None: read from the file
      assert fv[name].value == value, name


def test_native_safetensors_export(tmp_path):
  state = _random_vgg_jax('vgg11', seed=5)
  meta = pretrained.make_metadata('vgg11', normalization='imagenet_mean_std',
                                  **SMALL)
  src = pretrained.save_pretrained(tmp_path / 'pt', state, meta)
  out = convert.export_weights(src, tmp_path / 'w.safetensors',
                               to='safetensors')
  tensors = load_file(out)
  flat = trees.flatten(state)
  assert set(tensors) == {trees.path_str(k) for k in flat}
  np.testing.assert_array_equal(tensors['fc6.kernel'], flat[('fc6', 'kernel')])


def _small_tv_file(tmp_path, name='vgg11', edit=None):
  sd = random_state_dict(torch_shapes(name, **SMALL), seed=6)
  if edit:
    edit(sd)
  src = tmp_path / 'in.safetensors'
  save_file(sd, src)
  return src


@pytest.mark.parametrize('edit,expected', [
    (lambda sd: sd.pop('features.3.weight'),
     'missing: features.3.weight (8, 4, 3, 3)'),
    (lambda sd: sd.update({'features.99.weight': np.zeros(3, np.float32)}),
     'unexpected: features.99.weight (3,)'),
    (lambda sd: sd.update({'classifier.3.weight': np.zeros((256, 255),
                                                           np.float32)}),
     'wrong shape: classifier.3.weight is (256, 255), expected (256, 256)'),
])
def test_mismatch_is_an_error_listing_the_tensors_and_writes_nothing(
    tmp_path, edit, expected):
  src = _small_tv_file(tmp_path, edit=edit)
  with pytest.raises(ValueError) as e:
    convert.convert_file('torchvision', src, tmp_path / 'out', 'vgg11',
                         width_multiplier=SMALL['width_multiplier'])
  assert expected in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ['in.safetensors']


def test_wrong_model_names_the_right_one_and_cli_fails(tmp_path, capsys):
  src = _small_tv_file(tmp_path, name='vgg11_bn')
  code = cli.call(convert.define_flags, convert.main, [
      '--source=torchvision', '--model=vgg11', f'--input={src}',
      f'--output={tmp_path / "out"}', '--width_multiplier=0.0625'])
  assert code == 1
  err = capsys.readouterr().err
  assert 'unexpected: features.1.running_mean (4,)' in err
  assert 'The file matches --model=vgg11_bn --include_top=true.' in err
  assert sorted(os.listdir(tmp_path)) == ['in.safetensors']


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  src = _small_tv_file(tmp_path)

  def fail(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(pretrained.ocp.StandardCheckpointer, 'save', fail)
  with pytest.raises(OSError, match='disk full'):
    convert.convert_file('torchvision', src, tmp_path / 'out', 'vgg11',
                         width_multiplier=SMALL['width_multiplier'])
  assert sorted(os.listdir(tmp_path)) == ['in.safetensors']


def test_existing_output_is_kept_unless_overwrite(tmp_path):
  src = _small_tv_file(tmp_path)
  (tmp_path / 'out').mkdir()
  with pytest.raises(FileExistsError):
    convert.convert_file('torchvision', src, tmp_path / 'out', 'vgg11',
                         width_multiplier=SMALL['width_multiplier'])
  convert.convert_file('torchvision', src, tmp_path / 'out', 'vgg11',
                       overwrite=True,
                       width_multiplier=SMALL['width_multiplier'])
  assert pretrained.is_pretrained_dir(tmp_path / 'out')
  assert sorted(os.listdir(tmp_path)) == ['in.safetensors', 'out']


def test_export_is_all_or_nothing_and_keeps_existing_output(tmp_path,
                                                           monkeypatch):
  state = _random_vgg_jax('vgg11', seed=7)
  meta = pretrained.make_metadata('vgg11', normalization='imagenet_mean_std',
                                  **SMALL)
  src = pretrained.save_pretrained(tmp_path / 'pt', state, meta)
  out = tmp_path / 'tv.safetensors'
  out.write_bytes(b'old')
  with pytest.raises(FileExistsError, match='--overwrite'):
    convert.export_weights(src, out)
  assert out.read_bytes() == b'old'
  with pytest.raises(ValueError, match=r'must end in \.safetensors\.$'):
    convert.export_weights(src, tmp_path / 'w.pth', to='safetensors')

  def half_written(path, *args, **kwargs):
    pathlib.Path(path).write_bytes(b'partial')
    raise OSError('disk full')
  with monkeypatch.context() as m:
    m.setattr(weight_files, 'write_weights', half_written)
    with pytest.raises(OSError, match='disk full'):
      convert.export_weights(src, out, overwrite=True)
  assert out.read_bytes() == b'old'
  assert sorted(os.listdir(tmp_path)) == ['pt', 'tv.safetensors']
  convert.export_weights(src, out, overwrite=True)
  assert set(load_file(out)) == set(torch_shapes('vgg11', **SMALL))
  assert sorted(os.listdir(tmp_path)) == ['pt', 'tv.safetensors']


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch fails
  src = tmp_path / 'vgg16-397923af.pth'
  src.write_bytes(b'not read')
  with pytest.raises(ImportError, match='needs torch.*safetensors'):
    convert.import_weights('torchvision', src, 'vgg16')


def test_unsupported_model_and_class_names(tmp_path):
  with pytest.raises(ValueError, match="torchvision has no 'vgg16_c'"):
    layouts.source_layout('torchvision', 'vgg16_c')
  with pytest.raises(ValueError, match="keras has no 'vgg11'"):
    layouts.source_layout('keras', 'vgg11')
  src = _small_tv_file(tmp_path)
  with pytest.raises(ValueError, match='3 class names for 10 classes'):
    convert.import_weights('torchvision', src, 'vgg11',
                           class_names=['a', 'b', 'c'],
                           width_multiplier=SMALL['width_multiplier'])
  names = tmp_path / 'names.txt'
  names.write_text('\n'.join(f'c{i}' for i in range(10)) + '\n')
  _, meta = convert.import_weights(
      'torchvision', src, 'vgg11', class_names=convert.read_class_names(names),
      width_multiplier=SMALL['width_multiplier'])
  assert meta['class_names'] == [f'c{i}' for i in range(10)]


# ------------------------------------------------------------------ Keras ---


def _keras():
  import keras  # pylint: disable=g-import-not-at-top
  return keras


def _random_biases(model, seed):
  # keras.applications starts biases at zero; random ones test their mapping.
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if getattr(layer, 'bias', None) is not None:
      layer.bias.assign(
          (0.1 * rng.standard_normal(layer.bias.shape)).astype(np.float32))


def _keras_logits_parity(tmp_path, arch, filename, legacy):
  keras = _keras()
  keras.utils.set_random_seed(7)
  build = getattr(keras.applications, arch.upper())
  kmodel = build(weights=None, classifier_activation=None)  # pre-softmax
  _random_biases(kmodel, seed=8)
  path = tmp_path / filename
  if legacy:  # the format of the published vgg16_weights_tf_..._kernels.h5
    import h5py  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(path, 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, kmodel)
  else:
    kmodel.save_weights(path)
  imgs = images(2, 224, seed=9)
  preprocess = getattr(keras.applications, arch).preprocess_input
  want = np.asarray(kmodel(preprocess(imgs.astype(np.float32).copy()),
                           training=False))
  # Expected tensor names/shapes come from the Keras model itself.
  keras_shapes = {f'{l.name}/{n}': tuple(w.shape) for l in kmodel.layers
                  for n, w in zip(('kernel', 'bias'), l.weights)}
  assert layouts.expected_source_shapes('keras', arch) == keras_shapes
  del kmodel
  out = convert.convert_file('keras', path, tmp_path / 'pt', arch)
  model, meta = pretrained.load_pretrained(out)
  assert meta['normalization'] == 'caffe_bgr'
  assert meta['channel_order'] == 'BGR'
  got = model(preprocessing.normalize(imgs, meta['normalization']))
  assert_close(got, want, rtol=1e-4)


def test_keras_vgg16_weights_h5_logits_match(tmp_path):
  _keras_logits_parity(tmp_path, 'vgg16', 'vgg16.weights.h5', legacy=False)


def test_keras_vgg19_legacy_h5_logits_match(tmp_path):
  _keras_logits_parity(tmp_path, 'vgg19', 'vgg19_legacy.h5', legacy=True)


def test_keras_include_top_false_block5_match(tmp_path):
  keras = _keras()
  keras.utils.set_random_seed(10)
  kmodel = keras.applications.VGG16(weights=None, include_top=False,
                                    input_shape=(64, 64, 3))
  _random_biases(kmodel, seed=11)
  path = tmp_path / 'vgg16_notop.weights.h5'
  kmodel.save_weights(path)
  imgs = images(2, 64, seed=12)
  want = np.asarray(kmodel(keras.applications.vgg16.preprocess_input(
      imgs.astype(np.float32).copy()), training=False))

  with pytest.raises(ValueError, match='--include_top=false'):
    convert.import_weights('keras', path, 'vgg16')
  out = convert.convert_file('keras', path, tmp_path / 'pt', 'vgg16',
                             include_top=False)
  state, meta = pretrained.load_state_dict(out)
  assert meta['include_top'] is False and 'fc6' not in state
  # The head is random: any head options may change, e.g. a 1x1 FC-6 so
  # that a 64-pixel image is large enough.
  model, _ = pretrained.load_pretrained(out, fc6_kernel=1, num_classes=5)
  got = model.features(preprocessing.normalize(imgs, 'caffe_bgr'))['pool5']
  assert got.shape == (2, 2, 2, 512)
  assert_close(got, want, rtol=1e-4)

  # --flip_to_rgb: the same features from RGB input minus the mean RGB.
  out = convert.convert_file('keras', path, tmp_path / 'rgb', 'vgg16',
                             include_top=False, flip_to_rgb=True)
  model, meta = pretrained.load_pretrained(out, fc6_kernel=1)
  assert meta['normalization'] == 'mean_rgb' and meta['channel_order'] == 'RGB'
  x = preprocessing.normalize(imgs, 'mean_rgb', mean_rgb=meta['mean_rgb'])
  assert_close(model.features(x)['pool5'], want, rtol=1e-4)
  assert json.loads((out / 'metadata.json').read_text())['source'] == 'keras'


def test_no_weight_layout_offers_the_5x5_net():
  for source in layouts.SUPPORTED_MODELS:
    with pytest.raises(ValueError, match=f"{source} has no 'vgg13_5x5'"):
      layouts.check_supported(source, 'vgg13_5x5')
