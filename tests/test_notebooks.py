"""The Colab notebooks run top to bottom, headless, on tiny settings.

Each notebook is executed by nbclient in a Jupyter kernel started with this
interpreter, in a temporary folder, with ``VGG_JAX_NOTEBOOK_SMOKE=1`` and the
``VGG_JAX_*`` variables its parameters cell reads; any cell error fails the
test. Nothing downloads: the quickstart reads the tiny IDX set that
``conftest.py`` writes, the pretrained notebook a VGG-16 weight file that
Keras writes from a randomly initialised ``keras.applications.VGG16``.

The numbers the quickstart notebook, the README's quickstart sections and the
quickstart config's docstring state about the config (S range, crop size,
width, validation and test scales, epochs, steps) are read back from their
text and checked against ``configs/quickstart.py``, so a config change that
leaves them stale fails here.
"""

import ast
import json
import os
import pathlib
import re
import shutil
import sys

from conftest import load_config
import nbclient
from nbclient.exceptions import CellExecutionError
import nbformat
import pytest

from vgg_jax import protocols

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
NOTEBOOK_NAMES = ('quickstart', 'pretrained')
KERNEL_NAME = 'vgg_jax_test'
CELL_TIMEOUT_S = 600  # a hung cell fails the test instead of hanging CI
FASHION_MNIST_TRAIN_EXAMPLES = 60_000  # the split the quickstart trains on


def read_notebook(name):
  return nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)


def parameter(nb, name):
  """The literal value assigned to ``name`` in the notebook's parameters cell."""
  cell = next(c for c in nb.cells
              if 'parameters' in c.metadata.get('tags', []))
  for node in ast.parse(cell.source).body:
    if (isinstance(node, ast.Assign) and
        [getattr(t, 'id', None) for t in node.targets] == [name]):
      return ast.literal_eval(node.value)
  raise KeyError(f'No {name} = <literal> in the parameters cell.')


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


def quickstart_facts(config):
  """What the texts may say about the quickstart config, as the code has it."""
  steps_per_epoch = FASHION_MNIST_TRAIN_EXAMPLES // config.train.batch_size
  return {
      'S range': (config.input.scale_min, config.input.scale_max),
      'crop': config.input.crop_size,
      'width': config.model.width_multiplier,
      'fc6_kernel': config.model.fc6_kernel,
      'validation Q': config.input.eval_scales[0],
      'single Q': protocols.default_scales(config)[0],
      'multi Q': protocols.default_scales(config, multi_scale=True),
      # As the training loop counts them: whole batches per epoch.
      'steps': int(config.train.num_epochs * steps_per_epoch),
      'epochs': config.train.num_epochs,
      'batch': config.train.batch_size,
  }


def _number(text):
  return float(text.replace(',', ''))


# (fact, pattern): every match of the pattern states that fact. Text is
# searched with line breaks turned into spaces.
STATED = (
    ('S range', r'\[(\d+), (\d+)\]'),
    ('crop', r'(\d+)x\d+ crops'),
    ('crop', r'(\d+) px crops'),
    ('width', r'at (\d+)/(\d+) width'),
    ('fc6_kernel', r'fc6_kernel = (\d+)'),
    ('validation Q', r'(?:centre crops? at|validation on the test split at) '
                     r'Q = (\d+)'),
    ('single Q', r'single test scale [^.]*?Q = (\d+)'),
    ('single Q', r'Default Q = (\d+)'),
    ('multi Q', r'multi-scale set is \{(\d+), (\d+), (\d+)\}'),
    ('steps', r'(\d[\d,]*) steps\b'),
    ('epochs', r'(\d+(?:\.\d+)?) epochs\b'),
    ('batch', r'steps of (\d+)'),
)


def stated_numbers(text, facts):
  """Finds the statements of ``STATED`` in ``text`` and checks each.

  Args:
    text: prose and comments about the quickstart config.
    facts: ``quickstart_facts(config)``.

  Returns:
    ``(found, wrong)``: ``(fact, matched text)`` of every statement, and a
    message for each one that disagrees with ``facts``.
  """
  text = ' '.join(text.split())
  found, wrong = [], []
  for fact, pattern in STATED:
    for m in re.finditer(pattern, text):
      groups = tuple(_number(g) for g in m.groups())
      if fact == 'width':
        stated = groups[0] / groups[1]
      else:
        stated = groups if len(groups) > 1 else groups[0]
      actual = facts[fact]
      found.append((fact, m.group(0)))
      if stated != (tuple(actual) if isinstance(actual, tuple) else actual):
        wrong.append(f'{fact}: {m.group(0)!r} but the config has {actual}')
  return found, wrong


def comments(source):
  """The ``#`` comments of a code cell (what a reader takes as prose)."""
  return '\n'.join(line.split('#', 1)[1] for line in source.splitlines()
                   if '#' in line)


def quickstart_texts():
  """{where: text} of everything that describes the quickstart config."""
  nb = read_notebook('quickstart')
  prose = '\n'.join(c.source if c.cell_type == 'markdown' else
                    comments(c.source) for c in nb.cells)
  readme = (REPO / 'README.md').read_text()
  config_file = (REPO / 'configs' / 'quickstart.py').read_text()
  return {'notebooks/quickstart.ipynb': prose,
          'README.md (Quickstart result)': readme_section(
              readme, '### Quickstart result'),
          'README.md (On the quickstart model)': readme_section(
              readme, '### On the quickstart model'),
          'configs/quickstart.py': config_file}


def readme_section(readme, heading):
  """From ``heading`` to the next heading."""
  assert heading in readme, heading
  section = readme.split(heading, 1)[1]
  return re.split(r'\n#{2,3} ', section, maxsplit=1)[0]


@pytest.mark.parametrize('where', sorted(quickstart_texts()))
def test_stated_quickstart_numbers_match_the_config(where):
  facts = quickstart_facts(load_config('quickstart'))
  found, wrong = stated_numbers(quickstart_texts()[where], facts)
  assert not wrong, f'{where} is stale: {wrong}'
  # Each text states these, so each is checked (and a rewording that hides
  # them from the patterns fails here instead of going unchecked).
  required = ({'S range', 'single Q'} if 'On the quickstart' in where else
              {'S range', 'epochs', 'steps', 'crop'})
  assert required <= {fact for fact, _ in found}, (where, found)


def test_stated_numbers_catch_a_changed_config():
  config = load_config('quickstart')
  config.input.scale_max += 12
  config.train.num_epochs += 1
  config.input.eval_scales = (40,)
  _, wrong = stated_numbers(quickstart_texts()['notebooks/quickstart.ipynb'],
                            quickstart_facts(config))
  assert any(w.startswith('S range') for w in wrong), wrong
  assert any(w.startswith('epochs') for w in wrong), wrong
  assert any(w.startswith('steps') for w in wrong), wrong
  assert any(w.startswith('validation Q') for w in wrong), wrong


def result_names(nb):
  """The rows the quickstart's evaluation prints, from its EVAL_PASSES."""
  return [f"{protocol} Q={','.join(map(str, scales))}"
          for pass_protocols, scales in parameter(nb, 'EVAL_PASSES')
          for protocol in pass_protocols]


def test_quickstart_notebook_tests_at_the_papers_scales():
  """Validation's Q, the paper's single test scale and its multi-scale set."""
  config = load_config('quickstart')
  nb = read_notebook('quickstart')
  passes = parameter(nb, 'EVAL_PASSES')
  used = {tuple(scales) for _, scales in passes}
  assert used == {tuple(config.input.eval_scales),
                  protocols.default_scales(config),
                  protocols.default_scales(config, multi_scale=True)}, used
  for pass_protocols, scales in passes:
    assert set(pass_protocols) <= set(protocols.PROTOCOLS), pass_protocols
    # Inside the training range: there the 1x1 dense map still sees most of
    # the image, and the multi-crop grid fits.
    assert all(config.input.scale_min <= q <= config.input.scale_max
               for q in scales), scales
  # Multi-crop where its 5x5 grid has distinct crops (Q above the crop).
  assert any('multi_crop' in pass_protocols and
             min(scales) > config.input.crop_size
             for pass_protocols, scales in passes), passes
  assert parameter(nb, 'PREDICT_WITH') in result_names(nb)


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
  table = text_of(outputs(nb, 'evaluate'))
  for name in result_names(nb):
    assert f'\n{name} ' in table, table
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
