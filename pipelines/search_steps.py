"""The search steps wired as rounds of parallel trials: shared by the pipeline and the search benchmark.

KFP pipelines have no loops, so the rounds are an outer ParallelFor run one
at a time; in each, ``search_ask`` returns the round's trials, an inner
ParallelFor trains them in parallel pods, and ``search_tell`` collects them.
Wiring only: the logic is in ``components/search.py`` and ``kftune.search``.
"""

import dataclasses

from kfp import dsl

from components.search import (
    search_ask,
    search_result,
    search_round_list,
    search_setup,
    search_tell,
    search_trial,
)


@dataclasses.dataclass
class SearchTasks:
    setup: dsl.PipelineTask
    rounds: dsl.PipelineTask
    ask: dsl.PipelineTask
    trial: dsl.PipelineTask
    tell: dsl.PipelineTask
    result: dsl.PipelineTask

    @property
    def all(self) -> list[dsl.PipelineTask]:
        return [self.setup, self.rounds, self.ask, self.trial, self.tell, self.result]


def search_steps(train_data, *, space, algorithm, max_trials, epochs, folds, seed, model, rounds, trials_per_round,
                 state_uri) -> SearchTasks:
    """Adds the search steps to the pipeline being defined; ``result.outputs['model']`` is the winner."""
    setup = search_setup(
        space=space, pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        algorithm=algorithm, max_trials=max_trials, epochs=epochs, folds=folds, seed=seed, model=model,
        state_uri=state_uri,
    ).set_display_name("search: setup")
    plan = setup.outputs["plan"]
    round_list = search_round_list(rounds=rounds).set_display_name("search: rounds")
    with dsl.ParallelFor(round_list.output, parallelism=1, name="search-rounds") as round_index:
        # .after() because KFP leaves a loop's item source out of its dependencies.
        asked = search_ask(plan=plan, count=trials_per_round, round_index=round_index).after(round_list)
        asked.set_display_name("search: ask")
        with dsl.ParallelFor(asked.output, name="search-trials") as trial:
            trained = search_trial(dataset=train_data, plan=plan, trial=trial).set_display_name("search: trial")
        told = search_tell(plan=plan, results=dsl.Collected(trained.output)).set_display_name("search: tell")
    result = search_result(
        dataset=train_data, plan=plan, rounds_done=dsl.Collected(told.output)
    ).set_display_name("search: result")
    return SearchTasks(setup, round_list, asked, trained, told, result)
