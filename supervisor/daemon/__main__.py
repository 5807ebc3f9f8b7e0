from supervisor.daemon.entry import main

main()
