r"""Top-5 classes for image files, with a trained run's own preprocessing.

Command line::

    python -m vgg_jax.predict --workdir=DIR cat.jpg dog.png
    python -m vgg_jax.predict --workdir=DIR --protocol=center_crop --json a.jpg

``DIR`` is a training workdir or a pretrained dir. Each image is rescaled so
its smallest side is Q (default: the paper's single test scale for the run,
see ``protocols.default_scales``), normalised as the checkpoint expects and
classified with dense evaluation (whole image + flip, the paper's protocol) or
one centre crop. An unreadable image is reported and skipped; the exit status
is then 1.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vgg_jax import cli
from vgg_jax import eval_plan
from vgg_jax import decoding
from vgg_jax import preprocessing
from vgg_jax import protocols
from vgg_jax.configs import base

PREDICT_PROTOCOLS = ('dense', 'center_crop')


def class_names(member: eval_plan.Member) -> list[str]:
  """Class names from the checkpoint metadata, else the prepared dataset.

  The dataset is only read if it is already prepared (predict never prepares
  or downloads one). Falls back to ``'class <i>'``.
  """
  names = member.metadata.get('class_names')
  # Only training runs name a dataset; a converted checkpoint's base config
  # would point at imagenet2012, which must not be touched.
  if not names and member.metadata.get('dataset'):
    try:
      # Imported here: it pulls in TFDS, needed only for this fallback.
      from vgg_jax import datasets  # pylint: disable=g-import-not-at-top
      data = member.config.data
      builder = datasets.get_builder(data.dataset, data_dir=data.data_dir,
                                     manual_dir=data.manual_dir)
      if datasets.is_prepared(builder):
        names = datasets.dataset_info(builder).class_names
    except Exception:  # pylint: disable=broad-except
      names = None  # no dataset here: numbered classes are still useful
  num_classes = int(member.model.num_classes)
  if not names or len(names) != num_classes:
    return [f'class {i}' for i in range(num_classes)]
  return [str(n) for n in names]


class Predictor:
  """Posteriors for single images with a member's preprocessing.

  Compiles one program per scale: every image is placed on the same canvas
  as in evaluation (``preprocessing.canvas_size``).
  """

  def __init__(self, member: eval_plan.Member, *, protocol: str = 'dense',
               scales: Sequence[int] | None = None):
    """Sets up the predictor.

    Args:
      member: the network and its config / checkpoint metadata.
      protocol: ``'dense'`` (whole image and its flip) or ``'center_crop'``.
      scales: test scales Q (posteriors averaged); None: the run's
        single-scale default.
    """
    if protocol not in PREDICT_PROTOCOLS:
      raise ValueError(f'Unknown protocol {protocol!r} for predict; valid: '
                       f'{", ".join(PREDICT_PROTOCOLS)}.')
    self.protocol = protocol
    self.crop_size = int(member.config.input.crop_size)
    self.scales = tuple(scales) if scales else protocols.default_scales(
        member.config)
    preprocessing.check_scale(self.scales, self.crop_size, 'Test scale')
    defaults = base.get_config().input
    self.interpolation = member.config.input.get('interpolation',
                                                 defaults.interpolation)
    self.max_aspect = member.config.input.get('dense_max_aspect',
                                              defaults.dense_max_aspect)
    graphdef, rng_state, self._weights = member.eval_split()
    self._run = jax.jit(protocols.SourceFn(
        graphdef, rng_state, member.normalizer(), protocol, self.crop_size))

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """Posteriors ``(classes,)`` of one RGB uint8 image ``(H, W, 3)``.

    The image is rescaled and placed exactly as the evaluation pipeline does
    (``input_pipeline`` 'center_crop' / 'full' modes).
    """
    pil = Image.fromarray(np.asarray(image, np.uint8))
    total = 0.0
    for q in self.scales:
      if self.protocol == 'center_crop':
        x = np.asarray(preprocessing.center_crop(
            pil, scale=q, crop_size=self.crop_size,
            interpolation=self.interpolation))
        valid = x.shape[:2]
      else:
        x, valid = preprocessing.rescale_to_canvas(
            pil, scale=q,
            canvas=preprocessing.canvas_size(q, self.max_aspect),
            interpolation=self.interpolation)
      total = total + self._run(self._weights, jnp.asarray(x[None]),
                                jnp.asarray([valid], jnp.int32))[0]
    return np.asarray(total / len(self.scales))


def top_k(posteriors: np.ndarray, names: Sequence[str], k: int = 5
          ) -> list[dict[str, Any]]:
  """The ``k`` most probable classes as dicts (rank, index, name, prob)."""
  order = np.argsort(-posteriors, kind='stable')[:k]
  return [{'rank': r + 1, 'class_index': int(i), 'class_name': names[i],
           'probability': float(posteriors[i])} for r, i in enumerate(order)]


def predict_files(member: eval_plan.Member, paths: Sequence[str], *,
                  protocol: str = 'dense',
                  scales: Sequence[int] | None = None,
                  k: int = 5) -> list[dict[str, Any]]:
  """Classifies image files; a failure on one file does not stop the others.

  Args:
    member: the network.
    paths: image files (any format PIL reads).
    protocol: ``'dense'`` or ``'center_crop'``.
    scales: test scales Q; None: the run's single-scale default.
    k: how many classes to return per image.

  Returns:
    Per path, ``{'path', 'predictions': [...]}`` or ``{'path', 'error'}``.
  """
  predictor = Predictor(member, protocol=protocol, scales=scales)
  names = class_names(member)
  out = []
  for path in paths:
    try:
      image = decoding.load_image(path)
    except Exception as e:  # pylint: disable=broad-except
      # One bad file must not stop the rest; the error names the file.
      out.append({'path': path, 'error': f'{type(e).__name__}: {e}'})
      continue
    out.append({'path': path,
                'predictions': top_k(predictor(image), names, k)})
  return out


def format_predictions(results: Sequence[dict[str, Any]]) -> str:
  """Human-readable lines, one block per image."""
  lines = []
  for r in results:
    lines.append(r['path'])
    if 'error' in r:
      lines.append(f'  error: {r["error"]}')
      continue
    for p in r['predictions']:
      lines.append(f'  {p["rank"]}. {100 * p["probability"]:6.2f}%  '
                   f'{p["class_name"]} ({p["class_index"]})')
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.predict`` (image files are arguments).

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_string('workdir', None, 'Training workdir or pretrained dir.',
                      required=True, flag_values=flag_values)
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best or a step number.',
                      flag_values=flag_values)
  flags.DEFINE_enum('protocol', 'dense', PREDICT_PROTOCOLS,
                    'dense: whole image + flip (default); center_crop.',
                    flag_values=flag_values)
  flags.DEFINE_string(
      'scales', None, 'Test scale(s) Q, e.g. 384 or 256,384,512 (posteriors '
      'averaged); default: the run\'s single-scale default.',
      flag_values=flag_values)
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.',
                       flag_values=flag_values)
  flags.DEFINE_bool('json', False, 'Print JSON instead of text.',
                    flag_values=flag_values)
  cli.define_config_overrides(flag_values)


def main(flag_values: flags.FlagValues, images: Sequence[str]) -> int:
  """``python -m vgg_jax.predict --workdir=DIR IMAGE...``; the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
    images: the image files (the positional arguments).

  Returns:
    0 when every image was classified, 1 when any failed.
  """
  if not images:
    raise ValueError('No image files given: python -m vgg_jax.predict '
                     '--workdir=DIR IMAGE...')
  member = eval_plan.load_member(
      flag_values.workdir, checkpoint=flag_values.checkpoint,
      config_overrides=functools.partial(cli.apply_config_overrides,
                                         flag_values=flag_values))
  results = predict_files(member, images, protocol=flag_values.protocol,
                          scales=protocols.parse_scales(flag_values.scales),
                          k=flag_values.top_k)
  if flag_values.json:
    print(json.dumps(results, indent=2))
  else:
    print(format_predictions(results))
  failed = [r['path'] for r in results if 'error' in r]
  if failed:
    print(f'{len(failed)} of {len(results)} image(s) failed: '
          f'{", ".join(failed)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main, positional=True)
