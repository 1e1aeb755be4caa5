"""Tests for the launch scripts in launch/.

Every script runs with a PATH that holds no gcloud (only the basic tools, plus
fakes where a test says so). Dry runs must print the exact commands; the real
paths run against fake gcloud / ssh / srun programs that log their arguments
and, for ssh, execute the remote command locally in a fake home directory.
"""

import io
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ('create_tpu.sh', 'setup_tpu.sh', 'train_tpu.sh', 'keep_training.sh',
           'prepare_imagenet.sh', 'tensorboard.sh', 'delete_tpu.sh',
           'gpu_multinode.sbatch', 'gpu_ssh.sh')
# What the scripts, the fakes and the remote commands they run need.
_TOOLS = ('bash', 'sh', 'env', 'dirname', 'basename', 'date', 'hostname',
          'tar', 'gzip', 'sed', 'head', 'cat', 'grep', 'seq', 'sleep', 'mkdir',
          'rm', 'cp', 'ls', 'touch', 'printf', 'chmod', 'sort')

_FAKE_GCLOUD = '''#!{python}
"""Stands in for gcloud: logs argv, replays TPU states and ssh exit codes."""
import json, os, pathlib, shutil, subprocess, sys
root = pathlib.Path(os.environ['FAKE_GCLOUD_DIR'])
args = sys.argv[1:]
with open(root / 'log.jsonl', 'a') as f:
  f.write(json.dumps(args) + '\\n')
def pop(name, default):
  path = root / name
  queue = json.loads(path.read_text()) if path.exists() else []
  if not queue:
    return default
  path.write_text(json.dumps(queue[1:]))
  return queue[0]
home = root / 'home'
if args[:3] == ['compute', 'tpus', 'tpu-vm']:
  verb = args[3]
  if verb == 'describe':
    state = pop('states.json', 'READY')
    if state == 'NOT_FOUND':
      sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND')
    print(state)
    sys.exit(0)
  if verb == 'scp':
    src, dest = [a for a in args[4:] if not a.startswith('--')]
    shutil.copy(src, home / dest.split(':', 1)[1])
    sys.exit(0)
  if verb == 'ssh':
    rc = pop('ssh_rc.json', 0)
    command = [a for a in args if a.startswith('--command=')][0]
    if (root / 'exec').exists():
      done = subprocess.run(['bash', '-c', command[len('--command='):]], cwd=home)
      rc = done.returncode or rc
    sys.exit(rc)
sys.exit(pop('other_rc.json', 0))
'''

# Records how vgg_jax.main would have been started; stands in for python.
_FAKE_MAIN = '''#!/usr/bin/env bash
out="${FAKE_OUT}/proc_${VGG_JAX_PROCESS_ID:-0}"
mkdir -p "${out}"
printf '%s\\n' "$@" > "${out}/args"
echo "$$" > "${out}/pid"
pwd > "${out}/cwd"
env | grep '^VGG_JAX_' | sort > "${out}/env"
exit "${FAKE_MAIN_RC:-0}"
'''


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def bin_dir(tmp_path) -> pathlib.Path:
  """A PATH directory with the basic tools and no gcloud."""
  path = tmp_path / 'bin'
  path.mkdir()
  for tool in _TOOLS:
    found = shutil.which(tool)
    assert found, f'{tool} is needed by the launch scripts'
    (path / tool).symlink_to(found)
  assert shutil.which('gcloud', path=str(path)) is None
  return path


@pytest.fixture
def fake_gcloud(tmp_path, bin_dir) -> pathlib.Path:
  """Installs the fake gcloud; returns its state directory."""
  root = tmp_path / 'gcloud'
  (root / 'home').mkdir(parents=True)
  _write_exe(bin_dir / 'gcloud', _FAKE_GCLOUD.format(python=sys.executable))
  return root


def _gcloud_log(root: pathlib.Path) -> list[list[str]]:
  lines = (root / 'log.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def _run(script: str, *args: str, tmp_path: pathlib.Path, bin_dir: pathlib.Path,
         env: dict[str, str] | None = None, check: bool = True,
         fake_root: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """Runs launch/<script> in a clean environment; returns the result."""
  full_env = {'PATH': str(bin_dir), 'HOME': str(tmp_path / 'home'),
              'TMPDIR': str(tmp_path), 'LANG': 'C.UTF-8'}
  if fake_root is not None:
    full_env['FAKE_GCLOUD_DIR'] = str(fake_root)
  full_env.update(env or {})
  result = subprocess.run([str(LAUNCH / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=120)
  if check:
    assert result.returncode == 0, result.stderr + result.stdout
  return result


def _commands(stdout: str) -> list[list[str]]:
  """The dry-run lines that are commands (not '#' notes), split like a shell."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line and not line.startswith('#')]


def _flag(argv: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_has_help(script, tmp_path, bin_dir):
  out = _run(script, '--help', tmp_path=tmp_path, bin_dir=bin_dir).stdout
  assert out.startswith('Usage:')
  assert '--dry-run' in out


@pytest.mark.parametrize('script', SCRIPTS)
def test_unknown_flag_is_a_clear_error(script, tmp_path, bin_dir):
  result = _run(script, '--no-such-flag', tmp_path=tmp_path, bin_dir=bin_dir,
                check=False)
  assert result.returncode != 0
  assert "unknown flag '--no-such-flag'" in result.stderr


def test_shellcheck_passes():
  shellcheck = pathlib.Path(sys.executable).parent / 'shellcheck'
  assert shellcheck.exists(), 'install the test extra: pip install -e .[test]'
  files = [str(LAUNCH / name) for name in (*SCRIPTS, 'env.sh', 'common.sh')]
  result = subprocess.run([str(shellcheck), '-x', *files], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable():
  for name in SCRIPTS:
    assert os.access(LAUNCH / name, os.X_OK), name


def test_create_honours_environment_overrides(tmp_path, bin_dir):
  env = {'TPU_NAME': 'foo', 'ZONE': 'bar', 'PROJECT': 'proj',
         'ACCELERATOR_TYPE': 'v4-32'}
  out = _run('create_tpu.sh', '--dry-run', '--spot', '--', '--internal-ips',
             tmp_path=tmp_path, bin_dir=bin_dir, env=env).stdout
  assert _commands(out) == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'foo', '--zone=bar',
      '--project=proj', '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base', '--spot', '--internal-ips']]


def test_create_flags_override_and_dry_run_env(tmp_path, bin_dir):
  out = _run('create_tpu.sh', '--name=n1', '--zone=europe-west4-a',
             '--preemptible', tmp_path=tmp_path, bin_dir=bin_dir,
             env={'DRY_RUN': '1', 'TPU_NAME': 'ignored'}).stdout
  (argv,) = _commands(out)
  assert argv[5:7] == ['n1', '--zone=europe-west4-a']
  assert '--preemptible' in argv and '--spot' not in argv


@pytest.mark.parametrize('accelerator, version', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_create_picks_runtime_for_generation(accelerator, version, tmp_path,
                                             bin_dir):
  out = _run('create_tpu.sh', '--dry-run', f'--accelerator-type={accelerator}',
             tmp_path=tmp_path, bin_dir=bin_dir).stdout
  assert _flag(_commands(out)[0], '--version') == version
  pinned = _run('create_tpu.sh', '--dry-run', tmp_path=tmp_path,
                bin_dir=bin_dir, env={'RUNTIME_VERSION': 'custom-image',
                                      'ACCELERATOR_TYPE': accelerator}).stdout
  assert _flag(_commands(pinned)[0], '--version') == 'custom-image'


@pytest.mark.parametrize('args, env, message', [
    (['--spot', '--preemptible'], {}, 'exclude each other'),
    ([], {'TPU_NAME': 'Bad_Name'}, 'not a valid TPU name'),
    ([], {'ACCELERATOR_TYPE': 'tpu-big'}, 'ACCELERATOR_TYPE'),
])
def test_create_rejects_bad_input(args, env, message, tmp_path, bin_dir):
  result = _run('create_tpu.sh', '--dry-run', *args, tmp_path=tmp_path,
                bin_dir=bin_dir, env=env, check=False)
  assert result.returncode != 0 and message in result.stderr


def test_real_run_without_gcloud_says_so(tmp_path, bin_dir):
  result = _run('create_tpu.sh', tmp_path=tmp_path, bin_dir=bin_dir,
                check=False)
  assert result.returncode != 0 and 'gcloud not found' in result.stderr


def test_delete_dry_run(tmp_path, bin_dir):
  out = _run('delete_tpu.sh', '--dry-run', '--yes', tmp_path=tmp_path,
             bin_dir=bin_dir, env={'TPU_NAME': 'foo', 'ZONE': 'bar'}).stdout
  assert _commands(out) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete',
                             'foo', '--zone=bar', '--quiet']]


def _remote(argv: list[str]) -> str:
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], argv
  return _flag(argv, '--command')


def _main_argv(remote: str) -> list[str]:
  """The vgg_jax.main command inside a remote train command."""
  words = shlex.split(remote.rsplit('exec ', 1)[1])
  assert words[:3] == ['.venv/bin/python', '-m', 'vgg_jax.main'], words
  return words[3:]


def test_train_dry_run_passes_config_workdir_and_extra_args(tmp_path, bin_dir):
  tricky = '--config.train.note=it\'s a "b" $HOME'
  out = _run('train_tpu.sh', '--dry-run', '--config=configs/vgg16.py', '--',
             '--config.train.batch_size=512', tricky, tmp_path=tmp_path,
             bin_dir=bin_dir, env={'BUCKET': 'bkt', 'TPU_NAME': 'foo',
                                   'ZONE': 'bar'}).stdout
  (argv,) = _commands(out)
  assert argv[5:8] == ['foo', '--zone=bar', '--worker=all']
  assert _main_argv(_remote(argv)) == [
      '--config=configs/vgg16.py', '--workdir=gs://bkt/workdirs/vgg16',
      '--config.data.data_dir=gs://bkt/tensorflow_datasets',
      '--multiprocess=auto', '--config.train.batch_size=512', tricky]


def test_train_pod_slice_forces_multiprocess(tmp_path, bin_dir):
  out = _run('train_tpu.sh', '--dry-run', '--config=configs/vgg11.py',
             '--workdir=gs://x/run1', '--data-dir=gs://d/tfds',
             '--accelerator-type=v4-32', tmp_path=tmp_path,
             bin_dir=bin_dir).stdout
  main = _main_argv(_remote(_commands(out)[0]))
  assert main == ['--config=configs/vgg11.py', '--workdir=gs://x/run1',
                  '--config.data.data_dir=gs://d/tfds', '--multiprocess=true']


def test_train_detach_and_stop(tmp_path, bin_dir):
  env = {'BUCKET': 'gs://bkt/'}
  out = _run('train_tpu.sh', '--dry-run', '--config=configs/vgg11.py',
             '--detach', tmp_path=tmp_path, bin_dir=bin_dir, env=env).stdout
  remote = _remote(_commands(out)[0])
  assert 'nohup .venv/bin/python -m vgg_jax.main' in remote
  assert '> train.log' in remote and 'gs://bkt/workdirs/vgg11' in remote
  out = _run('train_tpu.sh', '--dry-run', '--stop', tmp_path=tmp_path,
             bin_dir=bin_dir).stdout
  remote = _remote(_commands(out)[0])
  assert 'kill' in remote and 'vgg_jax.main -m' not in remote


@pytest.mark.parametrize('args, env, message', [
    ([], {'BUCKET': 'b'}, '--config'),
    (['--config=configs/nope.py'], {'BUCKET': 'b'}, 'not found'),
    (['--config=configs/vgg11.py'], {}, 'set BUCKET'),
    (['--config=configs/vgg11.py', '--multiprocess=maybe'], {'BUCKET': 'b'},
     '--multiprocess'),
])
def test_train_rejects_bad_input(args, env, message, tmp_path, bin_dir):
  result = _run('train_tpu.sh', '--dry-run', *args, tmp_path=tmp_path,
                bin_dir=bin_dir, env=env, check=False)
  assert result.returncode != 0 and message in result.stderr


def test_train_real_run_stops_stale_run_and_starts_main(tmp_path, bin_dir,
                                                        fake_gcloud):
  (fake_gcloud / 'exec').touch()
  remote_repo = fake_gcloud / 'home' / 'vgg_jax'
  (remote_repo / '.venv' / 'bin').mkdir(parents=True)
  _write_exe(remote_repo / '.venv' / 'bin' / 'python', _FAKE_MAIN)
  # A leftover training process from before, recorded in train.pid.
  stale = subprocess.Popen(
      [sys.executable, '-c', 'import time; time.sleep(60)', 'vgg_jax.main'])
  try:
    (remote_repo / 'train.pid').write_text(f'{stale.pid}\n')
    tricky = 'a b\'c'
    _run('train_tpu.sh', '--config=configs/vgg11.py', '--workdir=gs://w/run',
         '--', f'--config.train.note={tricky}', tmp_path=tmp_path,
         bin_dir=bin_dir, fake_root=fake_gcloud,
         env={'FAKE_OUT': str(tmp_path / 'out')})
    assert stale.wait(timeout=30) == -15  # stopped by SIGTERM, by its pid
  finally:
    stale.kill()
  proc = tmp_path / 'out' / 'proc_0'
  assert (proc / 'args').read_text().splitlines() == [
      '-m', 'vgg_jax.main', '--config=configs/vgg11.py', '--workdir=gs://w/run',
      '--multiprocess=auto', f'--config.train.note={tricky}']
  assert (proc / 'cwd').read_text().strip() == str(remote_repo)
  # exec keeps the pid, so train.pid names the training process itself.
  assert (remote_repo / 'train.pid').read_text() == (proc / 'pid').read_text()


def test_setup_dry_run_git_source(tmp_path, bin_dir):
  out = _run('setup_tpu.sh', '--dry-run', '--source=git',
             '--repo-url=https://example.com/vgg_jax.git', '--ref=v1',
             tmp_path=tmp_path, bin_dir=bin_dir).stdout
  (argv,) = _commands(out)
  assert '--worker=all' in argv
  remote = _remote(argv)
  assert ('git clone --depth=1 --branch v1 https://example.com/vgg_jax.git '
          'vgg_jax') in remote
  assert "pip install -q -e '.[tpu]'" in remote
  missing = _run('setup_tpu.sh', '--dry-run', '--source=git',
                 tmp_path=tmp_path, bin_dir=bin_dir, check=False)
  assert missing.returncode != 0 and '--repo-url' in missing.stderr


def test_setup_real_run_copies_tree_and_installs(tmp_path, bin_dir,
                                                 fake_gcloud):
  (fake_gcloud / 'exec').touch()
  # Stands in for python3.11: 'venv DIR' makes a venv whose python logs calls.
  _write_exe(bin_dir / 'fakepython', textwrap.dedent('''\
      #!/usr/bin/env bash
      [ "$1 $2" = "-m venv" ] || exit 9
      mkdir -p "$3/bin"
      printf '#!/usr/bin/env bash\\necho "$*" >> "%s/pip.log"\\n' "$FAKE_GCLOUD_DIR" > "$3/bin/python"
      chmod +x "$3/bin/python"
      '''))
  _run('setup_tpu.sh', tmp_path=tmp_path, bin_dir=bin_dir,
       fake_root=fake_gcloud, env={'REMOTE_PYTHON': 'fakepython'})
  verbs = [argv[3] for argv in _gcloud_log(fake_gcloud)]
  assert verbs == ['scp', 'ssh']
  assert all('--worker=all' in argv for argv in _gcloud_log(fake_gcloud))
  remote_repo = fake_gcloud / 'home' / 'vgg_jax'
  assert (remote_repo / 'configs' / 'vgg16.py').exists()
  assert (remote_repo / 'launch' / 'train_tpu.sh').exists()
  assert not (remote_repo / '.git').exists()
  assert not (remote_repo / '.venv' / 'lib').exists()  # local venv not copied
  calls = (fake_gcloud / 'pip.log').read_text().splitlines()
  assert calls[:2] == ['-m pip install -q --upgrade pip',
                       '-m pip install -q -e .[tpu]']


def test_keep_training_dry_run_shows_recovery(tmp_path, bin_dir):
  out = _run('keep_training.sh', '--dry-run', '--spot',
             '--config=configs/vgg16.py', '--', '--config.train.init_from=x',
             tmp_path=tmp_path, bin_dir=bin_dir,
             env={'BUCKET': 'bkt', 'TPU_NAME': 'foo', 'ZONE': 'bar'}).stdout
  commands = _commands(out)
  steps = [argv[4] if argv[0] == 'gcloud' else argv[0] for argv in commands]
  assert steps == ['describe', 'delete', 'create', 'describe', 'tar', 'scp',
                   'ssh', 'ssh']
  assert '--spot' in commands[2] and commands[2][5:7] == ['foo', '--zone=bar']
  assert _main_argv(_remote(commands[-1]))[-1] == '--config.train.init_from=x'


def test_keep_training_recovers_from_preemption(tmp_path, bin_dir, fake_gcloud):
  (fake_gcloud / 'states.json').write_text(json.dumps(
      ['NOT_FOUND', 'READY', 'PREEMPTED', 'PREEMPTED', 'CREATING', 'READY']))
  # setup ok, training cut by the preemption, setup ok, training done.
  (fake_gcloud / 'ssh_rc.json').write_text(json.dumps([0, 255, 0, 0]))
  _run('keep_training.sh', '--config=configs/vgg11.py', '--spot',
       '--poll-seconds=0', tmp_path=tmp_path, bin_dir=bin_dir,
       fake_root=fake_gcloud, env={'BUCKET': 'bkt'})
  log = _gcloud_log(fake_gcloud)
  steps = [argv[3] for argv in log]
  assert steps == ['describe', 'create', 'describe', 'scp', 'ssh', 'ssh',
                   'describe', 'describe', 'delete', 'create', 'describe',
                   'describe', 'scp', 'ssh', 'ssh']
  creates = [argv for argv in log if argv[3] == 'create']
  assert all('--spot' in argv for argv in creates)


def test_keep_training_gives_up_after_repeated_crashes(tmp_path, bin_dir,
                                                       fake_gcloud):
  (fake_gcloud / 'ssh_rc.json').write_text(json.dumps([0, 1, 1]))
  result = _run('keep_training.sh', '--config=configs/vgg11.py',
                '--poll-seconds=0', '--max-failures=2', tmp_path=tmp_path,
                bin_dir=bin_dir, fake_root=fake_gcloud, env={'BUCKET': 'bkt'},
                check=False)
  assert result.returncode != 0
  assert 'failed 2 times in a row' in result.stderr
  steps = [argv[3] for argv in _gcloud_log(fake_gcloud)]
  assert steps.count('ssh') == 3 and 'create' not in steps


def test_prepare_imagenet_dry_run(tmp_path, bin_dir):
  out = _run('prepare_imagenet.sh', '--dry-run', '--manual-dir=/data/imagenet',
             '--build-dir=/scratch/tfds', tmp_path=tmp_path, bin_dir=bin_dir,
             env={'BUCKET': 'gs://bkt'}).stdout
  build, upload = _commands(out)
  assert build[1] == '-c' and 'file_format="array_record"' in build[2]
  assert build[3:] == ['imagenet2012', '/scratch/tfds', '/data/imagenet']
  assert upload == ['gcloud', 'storage', 'rsync', '--recursive',
                    '/scratch/tfds/imagenet2012',
                    'gs://bkt/tensorflow_datasets/imagenet2012']
  result = _run('prepare_imagenet.sh', '--dry-run', tmp_path=tmp_path,
                bin_dir=bin_dir, check=False)
  assert result.returncode != 0 and '--manual-dir' in result.stderr


def _jpeg(rng: np.random.Generator) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(buffer,
                                                                    'JPEG')
  return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def test_prepare_imagenet_builds_array_record_and_uploads(tmp_path, bin_dir,
                                                          fake_gcloud):
  rng = np.random.default_rng(0)
  manual = tmp_path / 'manual'
  manual.mkdir()
  # The ImageNet layout in miniature: one tar per class inside the train tar.
  with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as train:
    for synset in ('n01440764', 'n01443537'):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(2):
          _add(class_tar, f'{synset}_{i}.JPEG', _jpeg(rng))
      _add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as val:
    for i in range(1, 4):
      _add(val, f'ILSVRC2012_val_{i:08d}.JPEG', _jpeg(rng))
  build = tmp_path / 'tfds'
  _run('prepare_imagenet.sh', f'--manual-dir={manual}', f'--build-dir={build}',
       '--upload-to=gs://bkt/tfds', tmp_path=tmp_path, bin_dir=bin_dir,
       fake_root=fake_gcloud)
  version_dir = next((build / 'imagenet2012').iterdir())
  info = json.loads((version_dir / 'dataset_info.json').read_text())
  assert info['fileFormat'] == 'array_record'
  counts = {split['name']: sum(int(n) for n in split['shardLengths'])
            for split in info['splits']}
  assert counts == {'train': 4, 'validation': 3}
  assert list(version_dir.glob('imagenet2012-train.array_record-*'))
  assert _gcloud_log(fake_gcloud) == [[
      'storage', 'rsync', '--recursive', str(build / 'imagenet2012'),
      'gs://bkt/tfds/imagenet2012']]


def test_tensorboard_dry_run(tmp_path, bin_dir):
  env = {'BUCKET': 'bkt', 'TPU_NAME': 'foo'}
  out = _run('tensorboard.sh', '--dry-run', '--port=7007', tmp_path=tmp_path,
             bin_dir=bin_dir, env=env).stdout
  (argv,) = _commands(out)
  assert argv[0].endswith('tensorboard')
  assert argv[1:] == ['--logdir=gs://bkt/workdirs', '--port=7007']
  out = _run('tensorboard.sh', '--dry-run', '--on-tpu', tmp_path=tmp_path,
             bin_dir=bin_dir, env=env).stdout
  (argv,) = _commands(out)
  assert '--worker=0' in argv and argv[-2:] == ['-L', '6006:localhost:6006']
  assert _remote(argv) == ('vgg_jax/.venv/bin/tensorboard '
                           '--logdir=gs://bkt/workdirs --port=6006')


_SLURM_ENV = {'SLURM_JOB_ID': '7', 'SLURM_JOB_NODELIST': 'gpu[017-018,020]',
              'SLURM_NNODES': '3', 'SLURM_NTASKS': '3',
              'SLURM_SUBMIT_DIR': str(REPO)}


def test_gpu_multinode_dry_run(tmp_path, bin_dir):
  out = _run('gpu_multinode.sbatch', '--dry-run', '--config=configs/vgg16.py',
             '--workdir=/shared/w', '--port=2222', '--',
             '--config.model.dtype=bfloat16', tmp_path=tmp_path,
             bin_dir=bin_dir, env=_SLURM_ENV).stdout
  cd, launch = _commands(out)
  assert cd == ['cd', str(REPO)]
  assert launch[:3] == ['env', 'VGG_JAX_COORDINATOR=gpu017:2222',
                        'VGG_JAX_NUM_PROCESSES=3']
  assert launch[3:7] == ['srun', '--ntasks=3', '--ntasks-per-node=1',
                         '--kill-on-bad-exit=1']
  assert launch[-6:] == ['-m', 'vgg_jax.main', '--config=configs/vgg16.py',
                         '--workdir=/shared/w', '--multiprocess=true',
                         '--config.model.dtype=bfloat16']
  outside = _run('gpu_multinode.sbatch', '--config=c.py', '--workdir=/w',
                 tmp_path=tmp_path, bin_dir=bin_dir, check=False)
  assert outside.returncode != 0 and 'not inside a SLURM job' in outside.stderr


def test_gpu_multinode_gives_each_task_its_process_id(tmp_path, bin_dir):
  # srun stand-in: runs the command once per task with its SLURM_PROCID.
  _write_exe(bin_dir / 'srun', textwrap.dedent('''\
      #!/usr/bin/env bash
      n=1
      while [[ "$1" == --* ]]; do
        case "$1" in --ntasks=*) n="${1#*=}" ;; esac
        shift
      done
      for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" & done
      wait
      '''))
  fake_main = _write_exe(tmp_path / 'fake_main', _FAKE_MAIN)
  _run('gpu_multinode.sbatch', '--config=configs/vgg16.py',
       '--workdir=/shared/w', f'--python={fake_main}', tmp_path=tmp_path,
       bin_dir=bin_dir, env={**_SLURM_ENV, 'FAKE_OUT': str(tmp_path / 'out')})
  for i in range(3):
    env = (tmp_path / 'out' / f'proc_{i}' / 'env').read_text().splitlines()
    assert env == ['VGG_JAX_COORDINATOR=gpu017:12345',
                   'VGG_JAX_NUM_PROCESSES=3', f'VGG_JAX_PROCESS_ID={i}']


_FAKE_SSH = '''#!/usr/bin/env bash
# ssh stand-in: drops options, runs the remote command here.
while [[ "$1" == -* ]]; do
  case "$1" in -o) shift 2 ;; *) shift ;; esac
done
host="$1"
shift
FAKE_HOST="${host}" exec bash -c "$*"
'''


def test_gpu_ssh_dry_run(tmp_path, bin_dir):
  out = _run('gpu_ssh.sh', '--dry-run', '--hosts=me@h1,h2',
             '--config=configs/vgg16.py', '--workdir=/w', '--remote-dir=/r',
             tmp_path=tmp_path, bin_dir=bin_dir).stdout
  first, second = _commands(out)
  assert first[:4] == ['ssh', '-tt', '-o', 'BatchMode=yes']
  assert (first[4], second[4]) == ('me@h1', 'h2')
  assert ('export VGG_JAX_COORDINATOR=h1:12345 VGG_JAX_NUM_PROCESSES=2 '
          'VGG_JAX_PROCESS_ID=1;') in second[5]
  assert second[5].startswith('cd /r ||')


def test_gpu_ssh_runs_every_host_and_stops_all_on_failure(tmp_path, bin_dir):
  _write_exe(bin_dir / 'ssh', _FAKE_SSH)
  fake_main = _write_exe(tmp_path / 'fake_main', _FAKE_MAIN)
  env = {'FAKE_OUT': str(tmp_path / 'out')}
  result = _run('gpu_ssh.sh', '--hosts=h1,h2', '--config=configs/vgg16.py',
                '--workdir=/w', f'--remote-dir={tmp_path}',
                f'--python={fake_main}', '--coordinator=10.0.0.1:999',
                tmp_path=tmp_path, bin_dir=bin_dir, env=env)
  assert '[h2] ' in result.stdout
  for i in range(2):
    proc = tmp_path / 'out' / f'proc_{i}'
    assert (proc / 'env').read_text().splitlines() == [
        'VGG_JAX_COORDINATOR=10.0.0.1:999', 'VGG_JAX_NUM_PROCESSES=2',
        f'VGG_JAX_PROCESS_ID={i}']
    assert (proc / 'cwd').read_text().strip() == str(tmp_path)
  # Host 'slow' would take a minute; host 'bad' fails at once.
  slow_main = _write_exe(tmp_path / 'slow_main', textwrap.dedent(f'''\
      #!/usr/bin/env bash
      [ "$FAKE_HOST" = bad ] && exit 3
      sleep 60
      touch {tmp_path}/slow_finished
      '''))
  result = _run('gpu_ssh.sh', '--hosts=slow,bad', '--config=configs/vgg16.py',
                '--workdir=/w', f'--remote-dir={tmp_path}',
                f'--python={slow_main}', tmp_path=tmp_path, bin_dir=bin_dir,
                check=False)
  assert result.returncode == 1
  assert 'a host failed' in result.stderr
  assert not (tmp_path / 'slow_finished').exists()
