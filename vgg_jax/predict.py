r"""Top-5 classes for image files, with a trained run's own preprocessing.

Command line::

    python -m vgg_jax.predict --workdir=DIR cat.jpg dog.png
    python -m vgg_jax.predict --workdir=DIR --protocol=center_crop --json a.jpg

``DIR`` is a training workdir or a pretrained dir. Each image is rescaled so
its smallest side is Q (default: the paper's single test scale for the run,
see ``evaluate.default_scales``), normalised as the checkpoint expects and
classified with dense evaluation (whole image + flip, the paper's protocol) or
one centre crop. An unreadable image is reported and skipped; the exit status
is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from vgg_jax import evaluate
from vgg_jax import preprocessing
from vgg_jax.configs import base

PREDICT_PROTOCOLS = ('dense', 'center_crop')


def class_names(member: evaluate.Member) -> list[str]:
  """Class names from the checkpoint metadata, else the prepared dataset.

  The dataset is only read if it is already prepared (predict never prepares
  or downloads one). Falls back to ``'class <i>'``.
  """
  names = member.metadata.get('class_names')
  # Only training runs name a dataset; a converted checkpoint's base config
  # would point at imagenet2012, which must not be touched.
  if not names and member.metadata.get('dataset'):
    try:
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

  def __init__(self, member: evaluate.Member, *, protocol: str = 'dense',
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
    self.scales = tuple(scales) if scales else evaluate.default_scales(
        member.config)
    small = [q for q in self.scales if q < self.crop_size]
    if small:
      raise ValueError(f'Scale(s) {small} are smaller than crop_size='
                       f'{self.crop_size}.')
    defaults = base.get_config().input
    self.interpolation = member.config.input.get('interpolation',
                                                 defaults.interpolation)
    self.max_aspect = member.config.input.get('dense_max_aspect',
                                              defaults.dense_max_aspect)
    graphdef, rng_state, weights = member.eval_split()
    normalize = member.normalizer()

    def run(weights, images, valid_size):
      net = nnx.merge(graphdef, rng_state, weights)
      x = normalize(images)
      if protocol == 'dense':
        return evaluate.dense_posteriors(net, x, valid_size, flip=True)
      return evaluate.center_crop_posteriors(net, x)

    self._weights = weights
    self._run = jax.jit(run)

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


def predict_files(member: evaluate.Member, paths: Sequence[str], *,
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
      image = preprocessing.load_image(path)
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


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags (``--config.field=value`` is handled apart)."""
  parser = argparse.ArgumentParser(
      prog='python -m vgg_jax.predict',
      description='Print the top classes of image files.')
  parser.add_argument('images', nargs='+', metavar='IMAGE',
                      help='Image files.')
  parser.add_argument('--workdir', required=True,
                      help='Training workdir or pretrained dir.')
  parser.add_argument('--checkpoint', default='latest',
                      help='latest, best or a step number.')
  parser.add_argument('--protocol', default='dense', choices=PREDICT_PROTOCOLS,
                      help='dense: whole image + flip (default); center_crop.')
  parser.add_argument(
      '--scales', default=None,
      help='Test scale(s) Q, e.g. 384 or 256,384,512 (posteriors averaged); '
      'default: the run\'s single-scale default.')
  parser.add_argument('--top_k', type=int, default=5,
                      help='Classes printed per image.')
  parser.add_argument('--json', action='store_true',
                      help='Print JSON instead of text.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m vgg_jax.predict --workdir=DIR IMAGE...``; the exit code.

  Args:
    argv: the arguments after the program name; None: ``sys.argv[1:]``.

  Returns:
    0 when every image was classified, 1 when any failed.
  """
  overrides, rest = evaluate.parse_config_overrides(
      sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  member = evaluate.load_member(args.workdir, checkpoint=args.checkpoint,
                                config_overrides=overrides)
  results = predict_files(member, args.images, protocol=args.protocol,
                          scales=evaluate.parse_scales(args.scales),
                          k=args.top_k)
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    print(format_predictions(results))
  failed = [r['path'] for r in results if 'error' in r]
  if failed:
    print(f'{len(failed)} of {len(results)} image(s) failed: '
          f'{", ".join(failed)}', file=sys.stderr)
    return 1
  return 0


def run_cli() -> None:
  """``main()`` with a one-line message instead of a traceback on bad input."""
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'vgg_jax.predict: error: {e}')


if __name__ == '__main__':
  run_cli()
