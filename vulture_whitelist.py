"""Names that vulture (the dead-code check of `make lint`) cannot see being used: each is called or read by a
framework, a protocol or by name. `vulture` reads this file with the code (paths in pyproject.toml)."""
# ruff: noqa
_ = object()

# typer: commands and the app's callback are registered by their decorators
_global
report_command
export_command

# Python protocols: module __getattr__ (lazy public API), __signature__ (the analyzers' generated __init__ as
# inspect shows it), pickle's persistent_id/persistent_load, torch.load's reader hooks
__getattr__
_.__signature__
_.persistent_id
_.persistent_load
_.load_bytes
_.read_metadata

# arguments a fixed signature imposes: __exit__ (tb), signal handlers (frame), Path.mkdir (exist_ok),
# transformers' TrainerCallback (control), FederatedCMD's local_train(model, optimizer, data, round)
tb
frame
exist_ok
control
round_

# training-framework hooks (Lightning, Hugging Face, torch.nn.Module)
_.on_train_start
_.on_train_epoch_end
_.on_train_end
_.on_train_begin
_.on_save
_.training_step
_.configure_optimizers
_.forward
_.learning_rate
_.gate

# public results: fitted attributes, dataclass fields written to JSON
_.layer_mode_counts_
_.reduced_trajectories_
wall_seconds
store_revision
ingested_at
floats_baseline

# read by name: getattr(self, "out_" + name) in cmd_fit_pass; figures named "module:function" in FigureSpec
_.out_mode
_.out_row_error
_.out_online_mode
_.out_online_a
_.out_online_b
spectrum_figure
coefficients_figure

# ResultView.has (analyzers/base.py) is unused; left to the estimator-contract work on the base classes
_.has

# pytest: fixtures requested for their effect, and the module-wide marker
fake_cmd
small_blocks
no_libc
no_credentials
user_settings
examples_on_path
pytestmark

# Lightning's save_hyperparameters() reads the __init__ arguments from the caller's frame
data_dir
