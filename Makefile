# kmeminspect — see README.md. Kernels, images and dumps live in $(KMEMINSPECT_CACHE), never in git.
PYTHON ?= python3
export KMEMINSPECT_CACHE ?= /var/cache/kmeminspect
PYTEST = $(PYTHON) -m pytest -p no:cacheprovider

.PHONY: setup demo test test-oldest-drgn test-slow check lint format docs fixtures bench bench-btf bench-large bench-trace stress fuzz clean-cache

setup:           ## install apt and pip prerequisites (idempotent)
	bash .ci/setup

demo: setup      ## the main job: boot the bundled hotplug guest and inspect it
	PYTHONPATH=vm-fixtures $(PYTHON) -m vmfixtures demo

test: setup lint test-oldest-drgn ## everything: fast tests (also on the oldest drgn), VM tests on every kernel generation (not the slow ones)
	$(PYTEST) -n 2 --dist loadgroup -m "not slow" tests

test-oldest-drgn: ## the fast tests in a venv with the oldest drgn pyproject claims, kmeminspect pip-installed there
	bash .ci/oldest-drgn

check: lint      ## the fast tests only (no VM), in seconds
	$(PYTEST) -m "not vm and not slow" tests

lint:
	$(PYTHON) -m ruff format --check kmeminspect vm-fixtures tests benchmarks
	$(PYTHON) -m ruff check kmeminspect vm-fixtures tests benchmarks
	$(PYTHON) -m mypy kmeminspect vm-fixtures/vmfixtures benchmarks/run.py benchmarks/btf_mode.py benchmarks/trace.py benchmarks/large_layout.py benchmarks/markdown.py tests/synthetic.py

format:
	$(PYTHON) -m ruff format kmeminspect vm-fixtures tests
	$(PYTHON) -m ruff check --fix kmeminspect vm-fixtures tests

docs:            ## the documentation site in site/ (MkDocs; warnings, broken links and anchors fail)
	$(PYTHON) -m mkdocs build --strict

fixtures:        ## fetch every kernel and capture every scenario (what the VM tests use)
	PYTHONPATH=vm-fixtures $(PYTHON) -m vmfixtures capture

bench:           ## kmeminspect against crash and makedumpfile on 2, 8 and 32 GiB dumps, --qemu, --live, then bench-btf and bench-large (docs/benchmarks.md)
	PYTHONPATH=vm-fixtures $(PYTHON) benchmarks/run.py
	PYTHONPATH=vm-fixtures $(PYTHON) benchmarks/btf_mode.py
	$(PYTHON) benchmarks/large_layout.py

bench-btf:       ## BTF mode against DWARF mode and crash kmem -n on the same 2, 8 and 32 GiB dumps: audit wall time, start-up, peak RSS
	PYTHONPATH=vm-fixtures $(PYTHON) benchmarks/btf_mode.py

bench-large:     ## the model, audit and map on synthetic snapshots of 256 GiB to 16 TiB machines (no reading)
	$(PYTHON) benchmarks/large_layout.py

bench-trace:     ## the cost of kmeminspect trace against bcc stackcount, in rootfs guests (docs/benchmarks.md)
	PYTHONPATH=vm-fixtures $(PYTHON) benchmarks/trace.py

test-slow:       ## everything: make test's tests and what it leaves out (long stress runs, every live-guest test on every generation; docs/testing.md)
	$(PYTEST) -n 2 --dist loadgroup tests

fuzz:            ## the hostile-input tests, random and long (make test runs them derandomized, briefly)
	KMEMINSPECT_FUZZ_EXAMPLES=$${KMEMINSPECT_FUZZ_EXAMPLES:-2000} $(PYTEST) tests/test_hostile_input.py

stress:          ## the long hotplug stress runs on every generation, reports printed (docs/stress.md)
	$(PYTEST) -m slow -s tests/test_stress.py

clean-cache:
	rm -rf $(KMEMINSPECT_CACHE)/captures $(KMEMINSPECT_CACHE)/initramfs
