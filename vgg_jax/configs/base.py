"""The paper's recipe (Simonyan & Zisserman 2015, Sec. 3) as a shared base config.

Every file in `configs/` starts from `get_config()` here and overrides a few
fields, e.g. `configs/vgg16.py`::

    from vgg_jax.configs import base
    def get_config(stage='s256'):
      return base.paper_stage('vgg16', stage)

Fields can be overridden on the command line: `--config.train.batch_size=128`.

The paper's training stages (Sec. 3.1: S=256, then S=384 and S in [256, 512],
each fine-tuning the previous one) are `STAGES`; `paper_stage(net, stage)` is
the config of one net at one stage, which each `configs/NET.py` returns for
`--config=configs/NET.py:STAGE`.
"""

import dataclasses

import ml_collections

from vgg_jax.preprocessing import IMAGENET_MEAN_RGB


def get_config() -> ml_collections.ConfigDict:
  """The paper's configuration D at S=256 on ImageNet; variants override it."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds init, data order, augmentation and dropout

  config.model = ml_collections.ConfigDict()
  config.model.name = 'vgg16'  # vgg11, vgg11_lrn, vgg13, vgg16_c, vgg16, vgg19 (+ _bn)
  config.model.num_classes = 1000  # FC-8 width; checked against the dataset
  config.model.dropout_rate = 0.5  # after FC-6 and FC-7
  config.model.width_multiplier = 1.0  # scales all widths; <1 for small experiments
  config.model.fc6_kernel = 7  # FC-6 conv size = crop_size / 32
  config.model.init = 'normal'  # normal (std 0.01, paper), glorot or he
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' on TPU/GPU
  config.model.param_dtype = 'float32'  # parameter storage dtype

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'imagenet2012'  # TFDS name, 'fashion_mnist' or 'image_folder'
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir (None: TFDS default)
  config.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # ImageNet tars / IDX files / image-folder root
  config.data.train_split = 'train'  # TFDS split for training
  config.data.eval_split = 'validation'  # TFDS split for validation
  config.data.num_workers = 8  # Grain worker processes per host (0: in-process)
  config.data.prefetch_buffer_size = 2  # batches prepared ahead per worker
  config.data.read_threads = 16  # reading/decoding threads per worker (hide storage latency)
  config.data.read_buffer_size = 128  # examples decoded ahead per worker
  config.data.cache_decoded_mb = 0.0  # decoded training images kept per worker (0: none), or the bound on the shard with input.augment_on_device
  config.data.eval_num_workers = -1  # Grain worker processes for evaluation (-1: as num_workers; 0: in-process)
  config.data.eval_read_threads = 2  # eval batches decoded at once per worker (memory)
  config.data.max_consecutive_skips = 100  # more unreadable records in a row: error
  config.data.classes = ()  # class subset: names or indices, remapped to 0..k-1 in this order; () = all

  config.input = ml_collections.ConfigDict()
  config.input.scale_min = 256  # training scale S (smallest side); S_min
  config.input.scale_max = 256  # S_max; S ~ U[S_min, S_max] per image when larger
  config.input.crop_size = 224  # training crop side
  config.input.random_flip = True  # random horizontal flip
  config.input.augment_on_device = False  # rescale-crop-flip in the train step; the decoded split held in memory (data.cache_decoded_mb), no workers
  config.input.pca_sigma = 0.1  # AlexNet PCA colour shift std (0: off)
  config.input.normalization = 'mean_rgb'  # mean_rgb (paper), imagenet_mean_std, caffe_bgr
  config.input.mean_rgb = IMAGENET_MEAN_RGB  # 0-255 mean subtracted by mean_rgb
  config.input.interpolation = 'bilinear'  # resampling filter: bilinear, bicubic, lanczos, ...
  config.input.jpeg_draft = True  # training: decode JPEGs at 1/2-1/8 size when S allows
  config.input.normalization_from_init = True  # init_from weights' normalisation unless normalization/mean_rgb are set
  config.input.max_image_pixels = 64_000_000  # larger images are skipped (decompression bombs)
  config.input.eval_scales = (256,)  # test scales Q (smallest side)
  config.input.dense_max_aspect = 1.5  # full-image eval canvas side: Q * this, up to a multiple of 32
  config.input.eval_protocol = 'center_crop'  # validation during training: center_crop or dense

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256  # global batch, divisible by the device count
  config.train.eval_batch_size = 256  # global eval batch
  config.train.num_epochs = 74.0  # upper bound; the plateau schedule may stop earlier
  config.train.max_steps = -1  # if > 0, overrides num_epochs
  config.train.learning_rate = 0.01  # initial learning rate
  config.train.momentum = 0.9  # SGD momentum
  config.train.weight_decay = 5e-4  # L2 coefficient (added to the loss gradient)
  config.train.decay_biases_and_norms = False  # also decay biases and BN params
  config.train.schedule = 'plateau'  # plateau (paper), step or cosine
  config.train.plateau_patience = 2  # evaluations without top-1 gain before a drop
  config.train.plateau_factor = 0.1  # learning-rate multiplier at each drop
  config.train.plateau_max_drops = 3  # the paper dropped three times
  config.train.plateau_min_delta = 0.0  # top-1 gain that counts as improvement
  config.train.stop_after_max_drops = True  # stop at the next plateau after the last drop
  config.train.step_boundaries_epochs = (30.0, 60.0)  # 'step' schedule drop epochs
  config.train.warmup_epochs = 0.0  # linear warm-up for step and cosine
  config.train.init_from = ''  # checkpoint dir: net A (deeper nets) or the same net (fine-tuning)
  config.train.init_layers = 'matching'  # what init_from copies: matching (same-shape layers; FC-8 may be new), trunk, or e.g. 'trunk,fc6,fc7'
  config.train.freeze = 'none'  # none, trunk (conv trunk and its BN fixed) or all_but_fc8 (linear classifier on FC-7)
  config.train.new_layers_lr_mult = 1.0  # learning-rate multiplier of the layers init_from did not copy
  config.train.shard_params = False  # FSDP-style: shard params/optimizer over the data axis
  config.train.eval_every_steps = 5000  # validation (and plateau check) period
  config.train.log_every_steps = 100  # training-metric period
  config.train.checkpoint_every_steps = 5000  # checkpoint period
  config.train.keep_checkpoints = 3  # most recent checkpoints kept (plus the best)
  config.train.strict_resume = False  # refuse (not fall back) when the newest checkpoint is damaged
  config.train.peer_timeout_s = 60.0  # multi-process: wait this long for a lost or late process, then exit
  config.train.profile_steps = 0  # if > 0, profile this many steps after step 10
  return config


# ----------------------------------------------------------------------------
# The paper's training stages (Sec. 3.1): one net trained at S=256, then
# fine-tuned at S=384, then with S drawn from [256, 512].

# The paper's crop side; stage scales are the paper's at this crop and scale
# with the crop for smaller experiments (see `stage_scales`).
PAPER_CROP = 224


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage of the paper, at its 224 px crops.

  Attributes:
    name: the argument of ``configs/NET.py:NAME``.
    scale_min: S (or S_min when jittered).
    scale_max: S (or S_max).
    learning_rate: initial learning rate.
    parent: the stage whose run initialises this one (its own net's run);
      None: the first stage, from net A (deeper nets) or random weights.
    multi_offset: the multi-scale test offset of a fixed S (Sec. 4.2: Q in
      {S-32, S, S+32}).
  """
  name: str
  scale_min: int
  scale_max: int
  learning_rate: float
  parent: str | None
  multi_offset: int = 32

  @property
  def jittered(self) -> bool:
    return self.scale_min != self.scale_max


STAGES: dict[str, Stage] = {
    's256': Stage('s256', 256, 256, 1e-2, None),
    # Fine-tunes the S=256 run (Sec. 3.1: "initialised with the weights
    # pre-trained with S = 256, and we used a smaller initial learning rate").
    's384': Stage('s384', 384, 384, 1e-3, 's256'),
    # The paper gives no learning rate for the jittered stage; it fine-tunes
    # a converged net like s384, so 1e-3 (docs/paper.md, Sec. 2).
    'jitter': Stage('jitter', 256, 512, 1e-3, 's384'),
}
DEFAULT_STAGE = 's256'
# Nets whose layers net A cannot initialise: their 5x5 convs do not take A's
# 3x3 kernels, so they start from Glorot (the paper's footnote).
NO_NET_A_INIT = ('vgg13_5x5',)


def stage(name: str) -> Stage:
  """The stage called ``name``; a ValueError naming the valid ones otherwise."""
  if name not in STAGES:
    raise ValueError(f'Unknown stage {name!r}; valid stages: '
                     f'{", ".join(STAGES)}.')
  return STAGES[name]


@dataclasses.dataclass(frozen=True)
class StageScales:
  """A stage's training and test scales at one crop size.

  Attributes:
    scale_min: S_min.
    scale_max: S_max.
    test_scale: the single test scale (Q = S, or the middle of [S_min,
      S_max]: 384 for [256, 512]).
    multi_scales: the multi-scale test set ({S-32, S, S+32} for fixed S,
      {S_min, middle, S_max} for jittered S).
  """
  scale_min: int
  scale_max: int
  test_scale: int
  multi_scales: tuple[int, ...]


def _scaled(scale: int, crop_size: int) -> int:
  return int(round(scale * crop_size / PAPER_CROP))


def stage_scales(name: str, crop_size: int = PAPER_CROP) -> StageScales:
  """The stage's scales, the paper's times ``crop_size / 224``.

  At 224 px crops these are the paper's numbers; at 32 px crops the stages
  become S = 37, 55 and [37, 73], the same ratios of scale to crop.

  Args:
    name: a stage name (``STAGES``).
    crop_size: the training crop side.
  """
  st = stage(name)
  s_min = _scaled(st.scale_min, crop_size)
  s_max = _scaled(st.scale_max, crop_size)
  if st.jittered:
    mid = _scaled((st.scale_min + st.scale_max) // 2, crop_size)
    return StageScales(s_min, s_max, mid, (s_min, mid, s_max))
  offset = _scaled(st.multi_offset, crop_size)
  return StageScales(s_min, s_max, s_min,
                     (max(s_min - offset, crop_size), s_min, s_min + offset))


def apply_stage(config: ml_collections.ConfigDict, net: str,
                stage_name: str) -> ml_collections.ConfigDict:
  """Turns ``config`` into the run of ``net`` at one of the paper's stages.

  Sets the model name, the training scales (scaled to
  ``config.input.crop_size``), the single validation scale and the learning
  rate; a net that net A cannot initialise (``NO_NET_A_INIT``) gets Glorot
  instead of std 0.01. ``train.init_from`` is left alone: it names a run
  (net A for the first stage of a deeper net, the parent stage otherwise).

  Args:
    config: a run config (``get_config()`` or a small-scale variant);
      changed in place.
    net: a model name (``vgg16``, ``vgg13_5x5``, ``vgg16_bn``, ...).
    stage_name: one of ``STAGES``.

  Returns:
    ``config``.
  """
  st = stage(stage_name)
  scales = stage_scales(stage_name, int(config.input.crop_size))
  config.model.name = net
  if net in NO_NET_A_INIT and config.model.init == 'normal':
    config.model.init = 'glorot'
  config.input.scale_min = scales.scale_min
  config.input.scale_max = scales.scale_max
  config.input.eval_scales = (scales.test_scale,)
  config.train.learning_rate = st.learning_rate
  return config


def paper_stage(net: str, stage_name: str = DEFAULT_STAGE
                ) -> ml_collections.ConfigDict:
  """The paper's ImageNet config of ``net`` at one stage (``configs/*.py``).

  Args:
    net: a model name.
    stage_name: one of ``STAGES``.
  """
  return apply_stage(get_config(), net, stage_name)
