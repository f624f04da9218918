"""swarmota: the command line and the demo, composing seeder, tracker and peer."""
