# bertpress as a build step. See docs/ci.md.
#
#   make compile RECIPE=recipes/minilm-int8.yaml OUT=build/minilm-int8
#
# `compile` fails (make exits non-zero) when bertpress does: exit 1 when a pass check or the
# fidelity budget broke (OUT then holds only report.json/report.md saying which), exit 2 on bad
# input. An unchanged rerun is "up to date" and returns in seconds; FORCE=1 rebuilds.

PYTHON ?= python3
BERTPRESS ?= $(PYTHON) -m compiler.cli
RECIPE ?= recipes/minilm-int8.yaml
OUT ?= build/$(basename $(notdir $(RECIPE)))
FORCE ?=

.PHONY: compile validate report-schema test

compile:
	$(BERTPRESS) compile $(RECIPE) --out $(OUT)$(if $(FORCE), --force)

validate:
	$(BERTPRESS) validate $(RECIPE)

# Regenerate the published JSON Schema of report.json (a test fails when it is stale).
report-schema:
	$(BERTPRESS) schema --report > docs/report.schema.json

test:
	$(PYTHON) -m pytest -q
