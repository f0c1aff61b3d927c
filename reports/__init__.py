"""What a person reads: the HTML gallery of captions, the plots of a run's losses and scores, the README's speed table."""
