"""What one evaluation pass computes, and from which inputs.

An evaluation (``evaluate.evaluate``) scores networks (``Member``: a model,
its run config and the preprocessing its weights expect; ``load_member``
reads one from a workdir or pretrained dir) with one or more of the paper's
protocols at one or more test scales Q. ``make_plan`` works out, once, every
(member, posterior source, scale) to compute per batch, the compiled program
that computes it (shared by members of one architecture and preprocessing),
the coefficients with which each protocol averages those posteriors, and the
input stream (pipeline mode, Q, crop) each reads; ``open_streams`` opens
those streams and ``next_batches`` reads them in lockstep. The kernels are in
``vgg_jax.protocols``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import (Any, Callable, Iterable, Iterator, Mapping,
                    MutableMapping, Sequence)

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding
import ml_collections
import numpy as np
from flax import nnx

from vgg_jax import preprocessing
from vgg_jax import protocols as protocols_lib
from vgg_jax import sharding as sharding_lib
from vgg_jax import weights as weights_lib

IteratorFn = Callable[..., Iterable[Mapping[str, np.ndarray]]]
ConfigOverrides = Callable[[ml_collections.ConfigDict], Any]
# (member index, posterior source, scale Q): one posterior per batch.
SourceKey = tuple[int, str, int]
# (input-pipeline mode, Q, crop size or None): one input stream.
StreamKey = tuple[str, int, int | None]


@dataclasses.dataclass
class Member:
  """One network to evaluate (an ensemble has several).

  Attributes:
    model: the VGG; evaluation uses an eval-mode view, the object is unchanged.
    config: its run config (``input.crop_size``, scales, normalisation).
    normalization: input normalisation the weights expect; None: the config's.
    mean_rgb: the mean for ``mean_rgb`` / ``caffe_bgr``; None: the config's.
    scales: its test scales Q; None: ``protocols.default_scales(config)``.
    name: label for logs and results (e.g. the workdir).
    step: checkpoint step, if known.
    metadata: the checkpoint's metadata (``class_names``, ...), if loaded.
  """
  model: nnx.Module
  config: ml_collections.ConfigDict
  normalization: str | None = None
  mean_rgb: Sequence[float] | None = None
  scales: Sequence[int] | None = None
  name: str = ''
  step: int | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def normalization_spec(self) -> tuple[str, tuple[float, ...] | None]:
    """``(normalization, mean_rgb)`` the weights expect (checkpoint first)."""
    normalization = self.normalization or self.config.input.normalization
    mean_rgb = (self.mean_rgb if self.mean_rgb is not None
                else self.config.input.get('mean_rgb'))
    return normalization, (None if mean_rgb is None
                           else tuple(float(v) for v in mean_rgb))

  def normalizer(self) -> Callable[[jax.Array], jax.Array]:
    """``uint8 images -> float32`` with the normalisation the weights expect."""
    return preprocessing.normalizer(*self.normalization_spec())

  def eval_split(self):
    """``(graphdef, rng_state, weights)`` of an eval-mode view of the model.

    ``weights`` holds everything but the dropout RNG state (parameters, BN
    statistics); ``nnx.merge(graphdef, rng_state, weights)`` rebuilds it. The
    member's own model object keeps its mode.
    """
    model = nnx.merge(*nnx.split(self.model))
    model.eval()
    return nnx.split(model, nnx.RngState, ...)


def load_member(path: str, *, checkpoint: str | int = 'latest',
                config_overrides: ConfigOverrides | None = None) -> Member:
  """Loads a training workdir or pretrained dir as an evaluation member.

  Args:
    path: a workdir (``config.json`` + ``checkpoints/``) or a pretrained dir.
    checkpoint: ``'latest'``, ``'best'`` or a step number.
    config_overrides: called on the run's config to change it in place,
      e.g. ``functools.partial(cli.apply_config_overrides,
      flag_values=flag_values)`` for ``--config.field=value`` flags.

  Returns:
    The member, with the checkpoint's own normalisation.
  """
  model, config, metadata = weights_lib.load_model(path, checkpoint=checkpoint)
  if config_overrides is not None:
    config_overrides(config)
  metadata = metadata or {}
  return Member(model, config, normalization=metadata.get('normalization'),
                mean_rgb=metadata.get('mean_rgb'), name=path,
                step=metadata.get('step'), metadata=metadata)


# ----------------------------------------------------------------------------
# The plan: test scales, weights, compiled programs and averaging terms.


def _replicate(tree, sharding: NamedSharding):
  """Puts every leaf on every device (works across processes)."""
  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)
  return jax.tree.map(put, tree)


class Program:
  """One jitted ``protocols.SourceFn``; counts and logs its compilations.

  Members with the same graph (architecture, dtype) and preprocessing share
  one program and pass their own weights, so an ensemble of nets of one
  architecture compiles once.
  """

  def __init__(self, fn: protocols_lib.SourceFn, mesh: Mesh):
    """Jits ``fn`` with replicated weights and batch-split inputs.

    Args:
      fn: the posterior function.
      mesh: the device mesh.
    """
    self.fn, self.source, self.traces = fn, fn.source, []
    batch = sharding_lib.batch_sharding(mesh)
    self._run = jax.jit(
        self._traced, in_shardings=(sharding_lib.replicated(mesh), batch,
                                    batch), out_shardings=batch)

  def _traced(self, weights, images, valid_size):
    # Runs only while jit traces, i.e. once per compiled input shape.
    self.traces.append(tuple(images.shape))
    logging.info('Compiling %s program #%d for input %s', self.source,
                 len(self.traces), images.shape)
    return self.fn(weights, images, valid_size)

  def __call__(self, weights, images, valid_size):
    return self._run(weights, images, valid_size)


@dataclasses.dataclass
class Plan:
  """What one evaluation pass computes.

  Attributes:
    members: the networks.
    scales: per member, its test scales.
    weights: per member, its replicated weights.
    programs: per member, ``{source: Program}`` (shared where possible).
    terms: per protocol, ``[(source key, coefficient)]``: the posteriors it
      averages.
    source_stream: per source key, the input stream ``(mode, Q, crop)`` it
      reads.
    grid: multi-crop grid side.
  """
  members: Sequence[Member]
  scales: list[tuple[int, ...]]
  weights: list[Any]
  programs: list[dict[str, Program]]
  terms: dict[str, list[tuple[SourceKey, float]]]
  source_stream: dict[SourceKey, StreamKey]
  grid: int

  def stream_keys(self) -> list[StreamKey]:
    """Every input stream the pass reads, in a fixed order."""
    return list(dict.fromkeys(self.source_stream.values()))

  def protocol_streams(self, protocol: str) -> set[StreamKey]:
    """The input streams one protocol reads."""
    return {self.source_stream[k] for k, _ in self.terms[protocol]}

  def used_programs(self, protocol: str) -> list[Program]:
    """The distinct programs one protocol runs."""
    progs = {id(self.programs[i][s]): self.programs[i][s]
             for (i, s, _), _ in self.terms[protocol]}
    return list(progs.values())

  def all_programs(self) -> list[Program]:
    """Every distinct program of the pass."""
    return list({id(p): p for progs in self.programs
                 for p in progs.values()}.values())


def _stream_key(member: Member, source: str, q: int) -> StreamKey:
  """Input stream of a source: (mode, Q, crop); only centre crops need crop."""
  crop = int(member.config.input.crop_size)
  return (protocols_lib.SOURCE_MODE[source], q,
          crop if source == 'center_crop' else None)


def _member_scales(member: Member, index: int, scales: Sequence[int] | None,
                   multi_scale: bool) -> tuple[int, ...]:
  """The given scales, else the member's own, else the paper's default."""
  if scales:
    qs = tuple(scales)
  elif member.scales:
    qs = tuple(member.scales)
  else:
    qs = protocols_lib.default_scales(member.config, multi_scale=multi_scale)
  preprocessing.check_scale(qs, int(member.config.input.crop_size),
                            f'{member.name or f"member {index}"}: test scale')
  return qs


def make_plan(members: Sequence[Member], protocols: Sequence[str],
          scales: Sequence[int] | None, multi_scale: bool, grid: int,
          mesh: Mesh) -> Plan:
  """Scales, weights, programs and averaging coefficients of every member.

  Args:
    members: the networks.
    protocols: validated names from ``protocols.PROTOCOLS``.
    scales: test scales Q for every member; None: each member's own or the
      paper's default (``protocols.default_scales``).
    multi_scale: with ``scales=None``, the paper's multi-scale default set.
    grid: multi-crop grid side.
    mesh: the device mesh (weights are replicated over it).

  Raises:
    ValueError: a test scale smaller than a member's crop.
  """
  sources = sorted({s for p in protocols
                    for s in protocols_lib.PROTOCOL_SOURCES[p]})
  member_scales, member_weights, programs, shared = [], [], [], {}
  for i, m in enumerate(members):
    member_scales.append(_member_scales(m, i, scales, multi_scale))
    graphdef, rng_state, weights = m.eval_split()
    member_weights.append(_replicate(weights, sharding_lib.replicated(mesh)))
    crop = int(m.config.input.crop_size)
    progs = {}
    for s in sources:
      key = (graphdef, s, m.normalization_spec(), crop, grid)
      if key not in shared:
        shared[key] = Program(protocols_lib.SourceFn(
            graphdef, rng_state, m.normalizer(), s, crop, grid), mesh)
      progs[s] = shared[key]
    programs.append(progs)
  # Averaged over scales, then over the protocol's sources, then members.
  terms = {}
  for p in protocols:
    p_sources = protocols_lib.PROTOCOL_SOURCES[p]
    terms[p] = [((i, s, q), 1.0 / (len(members) * len(p_sources) * len(qs)))
                for i, qs in enumerate(member_scales)
                for s in p_sources for q in qs]
  source_stream = {k: _stream_key(members[k[0]], k[1], k[2])
                   for p in protocols for k, _ in terms[p]}
  return Plan(members, member_scales, member_weights, programs, terms,
               source_stream, grid)


# ----------------------------------------------------------------------------
# Input streams: one per (mode, Q, crop), all yielding the same examples.


def _create_iterator(config, *, split, scale, mode, global_batch_size):
  # Imported here: it pulls in TFDS, which predict and notebooks that bring
  # their own batches do not need.
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create_eval_iterator(
      config, split=split, scale=scale, mode=mode,
      global_batch_size=global_batch_size)


def open_streams(keys: Sequence[StreamKey],
                 data_config: ml_collections.ConfigDict, *, split: str,
                 batch_size: int, iterator_fn: IteratorFn | None = None
                 ) -> dict[StreamKey, Iterator[Mapping[str, np.ndarray]]]:
  """One eval iterator per (mode, Q, crop) key.

  ``data.num_workers`` is shared out among the streams (at least one each),
  so a multi-scale, multi-protocol pass does not start a worker pool per
  stream.

  Args:
    keys: the plan's ``stream_keys()``.
    data_config: config whose ``data`` and ``input`` sections read the split.
    split: the dataset split.
    batch_size: the global batch.
    iterator_fn: ``fn(config, *, split, scale, mode, global_batch_size)``;
      None: ``input_pipeline.create_eval_iterator``.
  """
  iterator_fn = iterator_fn or _create_iterator
  workers = int(data_config.data.get('num_workers', 0))
  streams = {}
  for key in keys:
    mode, q, crop = key
    config = data_config.copy_and_resolve_references()
    if crop is not None:
      config.input.crop_size = crop
    if workers > 0:
      config.data.num_workers = max(1, workers // len(keys))
    streams[key] = iter(iterator_fn(config, split=split, scale=q, mode=mode,
                                    global_batch_size=batch_size))
  return streams


def _check_same_examples(batches: Mapping[Any, Mapping[str, np.ndarray]]):
  """All input streams must hold the same examples in the same order."""
  keys = list(batches)
  ref = batches[keys[0]]
  for key in keys[1:]:
    b = batches[key]
    same = (np.array_equal(np.asarray(b['mask']), np.asarray(ref['mask'])) and
            np.array_equal(np.where(ref['mask'], b['label'], 0),
                           np.where(ref['mask'], ref['label'], 0)))
    if not same:
      raise RuntimeError(
          f'The eval input streams {keys[0]} and {key} disagree on labels or '
          'padding: the eval iterator must yield the same examples in the '
          'same order at every scale and mode.')


def next_batches(streams: Mapping[StreamKey, Iterator[Any]],
                 stream_time: MutableMapping[StreamKey, float]
                 ) -> dict[StreamKey, Mapping[str, np.ndarray]] | None:
  """The next batch of every stream; None when all have ended together.

  Args:
    streams: ``open_streams``'s iterators.
    stream_time: seconds spent reading, per stream; added to.

  Raises:
    RuntimeError: streams that disagree on the examples or end apart.
  """
  batches = {}
  for key, it in streams.items():
    t = time.perf_counter()
    batches[key] = next(it, None)
    stream_time[key] += time.perf_counter() - t
  ended = [k for k, b in batches.items() if b is None]
  if not ended:
    _check_same_examples(batches)
    return batches
  if len(ended) != len(batches):
    raise RuntimeError(f'Eval input streams ended at different batches '
                       f'({ended} first); they must be the same length.')
  return None


def device_inputs(batch: Mapping[str, np.ndarray], mesh: Mesh
                  ) -> tuple[jax.Array, jax.Array]:
  """Global ``(images, valid_size)`` of one stream's batch, split over mesh.

  A centre-crop batch carries no ``valid_size``: its crops are all image.
  """
  images = batch['image']
  if 'valid_size' in batch:
    valid = np.asarray(batch['valid_size'], np.int32)
  else:
    valid = np.broadcast_to(np.asarray(images.shape[1:3], np.int32),
                            (images.shape[0], 2))
  inputs = sharding_lib.global_batch({'image': images, 'valid_size': valid},
                                     mesh)
  return inputs['image'], inputs['valid_size']
