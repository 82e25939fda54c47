"""The eval stage's measurements, one module each: distances.py (held-out distance error, directions, the
near-city table), choice.py (multiple choice, letters and cloze, with the named ceiling and the controls),
free_form.py (sampled answers), city_facts.py (facts about the hidden city, the paper cities' answers as options).
experiment.stage_eval runs them per hidden city."""
