"""The Colab notebooks run top to bottom, headless, on tiny settings.

Each notebook is executed by nbclient in a Jupyter kernel started with this
interpreter, in a temporary folder, with ``VGG_JAX_NOTEBOOK_SMOKE=1`` and the
``VGG_JAX_*`` variables its parameters cell reads; any cell error fails the
test. Nothing downloads: the quickstart reads the tiny IDX set that
``conftest.py`` writes, the pretrained notebook a VGG-16 weight file that
Keras writes from a randomly initialised ``keras.applications.VGG16``.
"""

import json
import os
import pathlib
import shutil
import sys

import nbclient
from nbclient.exceptions import CellExecutionError
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
NOTEBOOK_NAMES = ('quickstart', 'pretrained')
KERNEL_NAME = 'vgg_jax_test'
CELL_TIMEOUT_S = 600  # a hung cell fails the test instead of hanging CI


def read_notebook(name):
  return nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)


def execute(nb, tmp_path, monkeypatch, env):
  """Runs ``nb`` in a fresh kernel of this interpreter; returns it with outputs.

  Args:
    nb: the notebook (changed in place).
    tmp_path: the test's folder: the kernel's working directory is ``run/``
      in it, and a kernelspec naming ``sys.executable`` goes in ``jupyter/``.
    monkeypatch: points this process's ``JUPYTER_PATH`` at that kernelspec.
    env: extra environment variables for the kernel.

  Raises:
    CellExecutionError: a cell raised.
  """
  # A kernelspec of our own: 'python3' may resolve to another interpreter.
  spec_dir = tmp_path / 'jupyter' / 'kernels' / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'vgg_jax test', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  work = tmp_path / 'run'
  work.mkdir()
  kernel_env = dict(os.environ)
  kernel_env.update(
      # The working tree's package, whatever the venv's install points at.
      PYTHONPATH=os.pathsep.join(
          [str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
      # Headless: Agg rendering, figures sent to the notebook as PNGs.
      MPLBACKEND='module://matplotlib_inline.backend_inline',
      VGG_JAX_NOTEBOOK_SMOKE='1', VGG_JAX_REPO=str(REPO), **env)
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
      resources={'metadata': {'path': str(work)}})
  client.execute(env=kernel_env)
  return nb


def outputs(nb, cell_id):
  """The outputs of the cell with this id."""
  for cell in nb.cells:
    if cell.get('id') == cell_id:
      return cell.outputs
  raise KeyError(f'No cell {cell_id!r}.')


def text_of(cell_outputs):
  return ''.join(o.get('text', '') for o in cell_outputs
                 if o.output_type == 'stream')


def pngs(cell_outputs):
  return [o for o in cell_outputs
          if o.output_type in ('display_data', 'execute_result')
          and 'image/png' in o.get('data', {})]


@pytest.mark.parametrize('name', NOTEBOOK_NAMES)
def test_notebook_is_committed_clean(name):
  nb = read_notebook(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code
  for cell in code:
    assert cell.outputs == [], f'{name}: cell {cell.id} has outputs'
    assert cell.execution_count is None, f'{name}: cell {cell.id} was run'
  tagged = [c for c in code if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name}: needs one cell tagged parameters'
  assert 'VGG_JAX_NOTEBOOK_SMOKE' in tagged[0].source
  # The first code cell installs the package, and only in Colab.
  assert "'google.colab' in sys.modules" in code[0].source
  badge = ('https://colab.research.google.com/github/OWNER/vgg_jax/blob/main/'
           f'notebooks/{name}.ipynb')
  assert badge in nb.cells[0].source


def test_a_failing_cell_fails_the_run(tmp_path, monkeypatch):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell('import os\nx = 1'),
      nbformat.v4.new_code_cell("raise ValueError('boom ' + os.environ["
                                "'VGG_JAX_NOTEBOOK_SMOKE'])"),
      nbformat.v4.new_code_cell('never = True')])
  with pytest.raises(CellExecutionError, match='boom 1'):
    execute(nb, tmp_path, monkeypatch, {})
  assert nb.cells[0].execution_count == 1
  assert nb.cells[2].execution_count is None


def test_quickstart_notebook_runs(tmp_path, monkeypatch, fashion_idx_dir,
                                  tfds_dir):
  nb = execute(read_notebook('quickstart'), tmp_path, monkeypatch, {
      'VGG_JAX_IDX_DIR': str(fashion_idx_dir),
      'VGG_JAX_DATA_DIR': str(tfds_dir),
      'VGG_JAX_WORKDIR': str(tmp_path / 'workdir')})
  assert 'Stopped at step 6 (done)' in text_of(outputs(nb, 'train'))
  assert (tmp_path / 'workdir' / 'checkpoints' / '6').is_dir()
  assert len(pngs(outputs(nb, 'curves'))) == 1
  table = text_of(outputs(nb, 'dense'))
  for row in ('dense Q=32', 'dense Q=48', 'dense Q=32,48'):
    assert row in table
  assert 'Checkpoint step 6' in table
  assert len(pngs(outputs(nb, 'images'))) == 1
  # Nothing was written into the repository.
  assert not (NOTEBOOKS / 'workdirs').exists()


@pytest.fixture
def keras_vgg16_file(tmp_path):
  """A randomly initialised Keras VGG-16 saved as ``.weights.h5`` (553 MB)."""
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  path = tmp_path / 'vgg16.weights.h5'
  keras.applications.VGG16(weights=None).save_weights(path)
  keras.backend.clear_session()
  yield path
  path.unlink(missing_ok=True)  # pytest keeps recent tmp dirs: free the space


def test_pretrained_notebook_runs(tmp_path, monkeypatch, keras_vgg16_file):
  pretrained_dir = tmp_path / 'vgg16_keras'
  # Keras' imagenet_class_index.json layout, with made-up names.
  class_index = tmp_path / 'class_index.json'
  class_index.write_text(json.dumps(
      {str(i): [f'n{i:08d}', f'thing_{i}'] for i in range(1000)}))
  try:
    nb = execute(read_notebook('pretrained'), tmp_path, monkeypatch, {
        'VGG_JAX_WEIGHTS': str(keras_vgg16_file),
        'VGG_JAX_PRETRAINED_DIR': str(pretrained_dir),
        'VGG_JAX_CLASS_INDEX': str(class_index)})
    metadata = json.loads((pretrained_dir / 'metadata.json').read_text())
  finally:
    shutil.rmtree(pretrained_dir, ignore_errors=True)  # 553 MB
  assert metadata['source'] == 'keras'
  assert metadata['normalization'] == 'caffe_bgr'
  assert metadata['class_names'][:2] == ['thing_0', 'thing_1']
  assert "'normalization': 'caffe_bgr'" in text_of(outputs(nb, 'convert'))
  # Two sample photos, five named classes each.
  listing = text_of(outputs(nb, 'classify'))
  assert listing.count('images/') == 2, listing
  assert listing.count('  5. ') == 2, listing
  assert listing.count('thing_') == 10, listing
  assert len(pngs(outputs(nb, 'classify'))) == 1
  assert len(pngs(outputs(nb, 'heatmap'))) == 1
