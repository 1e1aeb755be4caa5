"""Fine-tune published ImageNet VGG-16 weights on your own image folder.

Images laid out as ``/data/my_images/<split>/<class>/<file>`` with splits
``train`` and ``validation`` (e.g. ``/data/my_images/train/daisy/1.jpg``).
Convert the torchvision weights once, fine-tune, then classify::

    python -m vgg_jax.convert --source=torchvision --model=vgg16 --input=vgg16-397923af.pth --output=weights/vgg16_tv
    python -m vgg_jax.main --config=configs/finetune.py --workdir=workdirs/my_images --config.train.init_from=weights/vgg16_tv --config.data.manual_dir=/data/my_images --config.model.num_classes=5
    python -m vgg_jax.predict --workdir=workdirs/my_images img.jpg

``model.num_classes`` is the number of class folders (5 here). Every layer
of the weights but FC-8 is copied; FC-8 (5 classes instead of 1,000) starts
from random and learns 10x faster than the rest. The input is normalised as
the converted weights record (torchvision: ``imagenet_mean_std``; Caffe/VGG
release files: ``caffe_bgr``), since this config does not set it; the log
says which it uses. The run records the folder's class names, which
``predict`` prints.

Variants on the command line:

- a frozen conv trunk (about 5x cheaper steps on a CPU, see
  `benchmarks/finetune_step.py`; BN statistics frozen too):
  ``--config.train.freeze=trunk``;
- a linear classifier on FC-7's features: ``--config.train.freeze=all_but_fc8``;
- re-initialise FC-6 and FC-7 too: ``--config.train.init_layers=trunk``;
- trunk-only weights (``convert --include_top=false``) work as they are: the
  whole head starts from random.

Schedule: 10 epochs at 1e-3, x0.1 after epochs 6 and 9 (a short step
schedule; a converged ImageNet net needs little). Training crops 224 px from
images rescaled to S in [256, 384]; validation: the centre crop at Q = 320,
the middle of the training range as the paper tests jittered nets (Sec. 3.2).
"""

from vgg_jax.configs import base


def get_config():
  """Returns the fine-tuning recipe."""
  config = base.get_config()
  config.model.name = 'vgg16'  # the converted weights' net
  # model.num_classes: the number of class folders, from the command line.

  config.data.dataset = 'image_folder'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.num_workers = 4  # Grain worker processes per host

  config.input.scale_min = 256  # S_min
  config.input.scale_max = 384  # S_max: scale jittering
  config.input.crop_size = 224  # fc6_kernel 7, as the ImageNet weights
  config.input.eval_scales = (320,)  # Q: the middle of [S_min, S_max]
  # input.normalization and mean_rgb stay at the base defaults, so the
  # init_from weights' own normalisation is used (vgg_jax.finetune).

  config.train.batch_size = 64  # global batch
  config.train.eval_batch_size = 64  # global eval batch
  config.train.num_epochs = 10.0
  config.train.learning_rate = 1e-3  # a tenth of training from scratch
  config.train.schedule = 'step'
  config.train.step_boundaries_epochs = (6.0, 9.0)
  config.train.init_from = ''  # the converted weights, from the command line
  config.train.init_layers = 'matching'  # all but FC-8 (a new class count)
  config.train.freeze = 'none'  # none, trunk or all_but_fc8
  config.train.new_layers_lr_mult = 10.0  # FC-8 learns at 1e-2
  config.train.eval_every_steps = 200  # validation period
  config.train.log_every_steps = 20  # training-metric period
  config.train.checkpoint_every_steps = 200  # checkpoint period
  return config
