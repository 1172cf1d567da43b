# The README's two commands: `make run` and `make test`.
.PHONY: run test bench
run:
	@./scripts/run
test:
	@./scripts/test
bench:
	@./scripts/bench
