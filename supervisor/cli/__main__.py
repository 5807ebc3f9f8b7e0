from supervisor.cli.fast import main

main()
