"""The paper's recipe (Simonyan & Zisserman 2015, Sec. 3) as a shared base config.

Every file in `configs/` starts from `get_config()` here and overrides a few
fields, e.g. `configs/vgg16.py`::

    from vgg_jax.configs import base
    def get_config():
      config = base.get_config()
      config.model.name = 'vgg16'
      return config

Fields can be overridden on the command line: `--config.train.batch_size=128`.
"""

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
  config.data.eval_read_threads = 2  # eval batches decoded at once per worker (memory)
  config.data.max_consecutive_skips = 100  # more unreadable records in a row: error

  config.input = ml_collections.ConfigDict()
  config.input.scale_min = 256  # training scale S (smallest side); S_min
  config.input.scale_max = 256  # S_max; S ~ U[S_min, S_max] per image when larger
  config.input.crop_size = 224  # training crop side
  config.input.random_flip = True  # random horizontal flip
  config.input.pca_sigma = 0.1  # AlexNet PCA colour shift std (0: off)
  config.input.normalization = 'mean_rgb'  # mean_rgb (paper), imagenet_mean_std, caffe_bgr
  config.input.mean_rgb = IMAGENET_MEAN_RGB  # 0-255 mean subtracted by mean_rgb
  config.input.interpolation = 'bilinear'  # resampling filter: bilinear, bicubic, lanczos, ...
  config.input.jpeg_draft = True  # training: decode JPEGs at 1/2-1/8 size when S allows
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
  config.train.shard_params = False  # FSDP-style: shard params/optimizer over the data axis
  config.train.eval_every_steps = 5000  # validation (and plateau check) period
  config.train.log_every_steps = 100  # training-metric period
  config.train.checkpoint_every_steps = 5000  # checkpoint period
  config.train.keep_checkpoints = 3  # most recent checkpoints kept (plus the best)
  config.train.profile_steps = 0  # if > 0, profile this many steps after step 10
  return config
