"""A small built-in English corpus, written for this project, that `make-model` trains its BPE tokenizer on.

No download is possible (or wanted) when writing a random checkpoint, so the text lives here. It mixes plain
prose, dialogue, numbers, punctuation and a little code so that the merges look like a real tokenizer's.
"""

CORPUS = """\
The morning train to the city was late again, and the people on the platform looked at their phones.
A small dog sat next to an old man who was reading a newspaper about the weather and the price of bread.
When the train finally arrived, everyone stepped inside and found a seat near the windows.
The city was waking up: shops opened their doors, buses moved slowly through the streets, and the smell of coffee filled the air.
She walked into the office at nine o'clock, said good morning to her friends, and started to work on the new project.
The project was about building a system that could answer questions quickly and correctly for many users at the same time.
To do that, the team had to think about memory, speed, and the cost of every single request.
Some of the engineers wanted to write everything from scratch, while others preferred to reuse what already worked well.
After a long discussion, they agreed to measure first and to change only what the numbers said was slow.
In the afternoon, it started to rain. The streets turned dark and shiny, and people opened their umbrellas.
A child jumped into a puddle and laughed, while his mother tried to pull him back to the dry side of the road.
Later that evening, the family cooked dinner together: rice, vegetables, fresh fish, and a warm soup with onions.
They talked about school, about work, and about the trip they were planning for the summer holidays.
The mountains were their first choice, because the air there is clean and the nights are quiet and cool.
History teaches us that great changes often begin with small ideas shared between a few curious people.
Scientists observe the world, ask questions, make predictions, and test them with careful experiments.
A good experiment can be repeated by anyone, anywhere, and it should give the same result every time.
Mathematics gives us a language for patterns: numbers, shapes, probabilities, and the rules that connect them.
For example, 2 + 2 = 4, 10 * 10 = 100, and the square root of 144 is 12.
The year 2024 had 366 days, and the meeting was moved from March 3rd to April 15th at 10:30 in the morning.
Prices rose by 3.5 percent last year, while wages grew by only 2.1 percent, so many families felt poorer.
The library is open from Monday to Friday, between 8 a.m. and 6 p.m., and on Saturday until noon.
Please remember to return your books on time; otherwise you will have to pay a small fee.
"What time is it?" asked the traveler. "It is almost five," answered the woman at the station.
"Thank you very much," he said, and he hurried towards the last bus of the day.
User: Can you explain what a computer network is?
Assistant: A computer network is a group of computers that are connected so they can share data and resources.
User: How does the internet work?
Assistant: The internet connects millions of networks around the world using common protocols such as TCP and IP.
User: What is the capital of France?
Assistant: The capital of France is Paris, a city famous for its art, food, and history.
User: Write a short poem about the sea.
Assistant: The sea is wide, the sea is deep, it sings the sailors off to sleep; its waves come in, its waves go out, and that is what the sea's about.
User: Summarize the story in one sentence.
Assistant: A young woman leaves her village, learns a new trade in the city, and returns home to help her family.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1
        return self.count

import json
data = {"name": "example", "values": [1, 2, 3], "enabled": true}
print(json.dumps(data, indent=2))
Good software is easy to read, easy to test, and easy to change when the requirements change.
Every function should do one thing, and its name should say what that thing is.
When a program fails, the error message should explain what went wrong and what the user can do about it.
Tests protect us from mistakes: they run the code with known inputs and compare the output with the expected answer.
The model reads a sequence of tokens and predicts the next token, one step at a time, until it reaches the end.
Each token is a small piece of text, such as a word, a part of a word, or a single character.
Language models learn from large amounts of text, and they become better when they see more examples.
The weather tomorrow will be sunny in the north, cloudy in the center, and rainy along the southern coast.
Temperatures will range from 12 to 24 degrees, with a light wind from the west.
Farmers hope for more rain, because the fields are dry and the rivers are low for this time of the year.
In the market, you can buy apples, oranges, bananas, tomatoes, potatoes, carrots, cheese, eggs, and bread.
The baker gets up at four in the morning to prepare the dough, and the first loaves are ready by six.
Music was playing in the park, where young people danced and older people sat on benches and watched.
The concert ended with a long applause, and the musicians bowed and smiled at the happy crowd.
Doctors recommend that adults sleep seven to nine hours each night, drink enough water, and walk every day.
Exercise improves the heart, the muscles, and the mind, and it helps people feel calm and focused.
The ship left the harbor at dawn, carrying cars, machines, and containers full of clothes and toys.
Its journey across the ocean would take three weeks, if the storms stayed away from its route.
The captain checked the maps, spoke with the crew, and wrote the position of the ship in the log book.
Once upon a time, in a small village between two hills, there lived a clever girl who loved to build things.
She built a bridge over the stream, a wheel that turned with the water, and a clock that never stopped.
People came from far away to see her work, and they asked her to teach their children how to build.
She agreed, and soon the village became known as the place where anyone could learn to make useful things.
Why do leaves change color in autumn? Because the trees stop making green chlorophyll as the days get shorter.
How far is the moon? It is about 384,400 kilometers away from the earth, on average.
Which animal is the largest? The blue whale is the largest animal known to have ever lived.
The committee will publish its report next week, and the government is expected to respond before the end of the month.
Students must submit their essays by Friday; late work will not be accepted without a good reason.
I think, therefore I am. To be or not to be, that is the question. Knowledge is power.
It was the best of times, and it was the worst of times, and nobody knew which one would win.
"""
